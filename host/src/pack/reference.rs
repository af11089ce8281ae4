//! The host reference interpreter of packed models: plain, obviously-correct loops that
//! follow `shared/FORMAT.md` ("Int8 execution semantics") literally, keeping every
//! node's output. It measures activation ranges for int8 calibration and evaluates
//! exactly what will be flashed; the device engine must agree with it bit for bit on
//! int8 models.

use ccnet_shared::format::{
    standardize_params, ActivationQuant, Container, DType, InputGeometry, MAX_STANDARDIZED_CHANNELS,
};
use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole, Shape};
use ccnet_shared::quant::{quantize_multiplier, requantize, Requant};

/// Why a reference run failed.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The model cannot run on this input.
    #[error("{0}")]
    Graph(ccnet_shared::graph::GraphError),
    /// A tensor or quantization entry the semantics require is absent or unusable.
    #[error("node {node}: {what}")]
    Model {
        /// The node.
        node: NodeId,
        /// What is wrong.
        what: String,
    },
    /// Input length does not match `C × H × W`.
    #[error("input has {found} values, the model needs {expected}")]
    Input {
        /// Needed.
        expected: usize,
        /// Given.
        found: usize,
    },
}

impl From<ccnet_shared::graph::GraphError> for ReferenceError {
    fn from(e: ccnet_shared::graph::GraphError) -> Self {
        ReferenceError::Graph(e)
    }
}

fn model_err(node: usize, what: impl Into<String>) -> ReferenceError {
    ReferenceError::Model {
        node: node as NodeId,
        what: what.into(),
    }
}

/// Every node's output of a float run, planar `C × H × W`.
pub struct FloatRun {
    /// Output shapes.
    pub shapes: Vec<Shape>,
    /// Output values per node (arg-max outputs hold class indices as `f32`).
    pub values: Vec<Vec<f32>>,
}

/// The float input of a model from 8-bit planar pixels, `x = (p / 255) · scale + offset`
/// with the model's fixed or per-image standardizing parameters (exactly as the device).
pub fn normalise_pixels(c: &Container<'_>, pixels: &[u8]) -> Vec<f32> {
    normalise_geometry(&c.header().input, pixels)
}

/// [`normalise_pixels`] for an input geometry.
pub fn normalise_geometry(g: &InputGeometry, pixels: &[u8]) -> Vec<f32> {
    let channels = g.channels.max(1) as usize;
    let plane = (pixels.len() / channels).max(1);
    let norm = if g.standardize {
        standardize_params(pixels, channels)
    } else {
        [(g.scale, g.offset); MAX_STANDARDIZED_CHANNELS]
    };
    pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let (scale, offset) = norm[(i / plane).min(MAX_STANDARDIZED_CHANNELS - 1)];
            (f32::from(p) / 255.0) * scale + offset
        })
        .collect()
}

fn float_tensor(
    c: &Container<'_>,
    node: usize,
    role: ParamRole,
) -> Result<Vec<f32>, ReferenceError> {
    let i = c
        .find(node as NodeId, role)
        .ok_or_else(|| model_err(node, format!("no {} tensor", role.name())))?;
    let bytes = c.tensor_bytes(i).unwrap_or(&[]);
    Ok(match c.tensors()[i].dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(model_err(
                node,
                format!("{} is {other:?}, not a float", role.name()),
            ))
        }
    })
}

/// Generic convolution loop shared by both precisions: calls `tap(o, oy, ox, i, ky, kx,
/// iy, ix)` for every in-bounds tap, in the order output, input channel, kernel row,
/// kernel column.
fn conv_taps(
    op: &Op,
    src: Shape,
    dst: Shape,
    mut tap: impl FnMut(usize, usize, usize, usize, usize, usize),
) {
    match *op {
        Op::Conv2d(c) => {
            let k = c.kernel as i64;
            for o in 0..dst.c as usize {
                for oy in 0..dst.h as i64 {
                    for ox in 0..dst.w as i64 {
                        let out = (o * dst.h as usize + oy as usize) * dst.w as usize + ox as usize;
                        for i in 0..src.c as usize {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = oy * c.stride as i64 - c.padding as i64
                                        + ky * c.dilation as i64;
                                    let ix = ox * c.stride as i64 - c.padding as i64
                                        + kx * c.dilation as i64;
                                    if iy < 0 || ix < 0 || iy >= src.h as i64 || ix >= src.w as i64
                                    {
                                        continue;
                                    }
                                    let inp = (i * src.h as usize + iy as usize) * src.w as usize
                                        + ix as usize;
                                    let w = ((o * src.c as usize + i) * k as usize + ky as usize)
                                        * k as usize
                                        + kx as usize;
                                    tap(out, o, inp, w, 0, 0);
                                }
                            }
                        }
                    }
                }
            }
        }
        Op::ConvTranspose2d(c) => {
            let k = c.kernel as i64;
            let s = c.stride as i64;
            for o in 0..dst.c as usize {
                for y in 0..dst.h as i64 {
                    for x in 0..dst.w as i64 {
                        let out = (o * dst.h as usize + y as usize) * dst.w as usize + x as usize;
                        for i in 0..src.c as usize {
                            for ky in 0..k {
                                let ny = y + c.padding as i64 - ky;
                                if ny < 0 || ny % s != 0 || ny / s >= src.h as i64 {
                                    continue;
                                }
                                for kx in 0..k {
                                    let nx = x + c.padding as i64 - kx;
                                    if nx < 0 || nx % s != 0 || nx / s >= src.w as i64 {
                                        continue;
                                    }
                                    let inp = (i * src.h as usize + (ny / s) as usize)
                                        * src.w as usize
                                        + (nx / s) as usize;
                                    let w = ((i * dst.c as usize + o) * k as usize + ky as usize)
                                        * k as usize
                                        + kx as usize;
                                    tap(out, o, inp, w, 0, 0);
                                }
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Spatial gather of window ops: for every output element, the input indices it reads.
fn window_max<T: Copy + PartialOrd>(
    src: &[T],
    s: Shape,
    d: Shape,
    kernel: u16,
    stride: u16,
) -> Vec<T> {
    let mut out = Vec::with_capacity(d.elements() as usize);
    for c in 0..d.c as usize {
        for y in 0..d.h as usize {
            for x in 0..d.w as usize {
                let mut best = src
                    [(c * s.h as usize + y * stride as usize) * s.w as usize + x * stride as usize];
                for ky in 0..kernel as usize {
                    for kx in 0..kernel as usize {
                        let v = src[(c * s.h as usize + y * stride as usize + ky) * s.w as usize
                            + x * stride as usize
                            + kx];
                        if v > best {
                            best = v;
                        }
                    }
                }
                out.push(best);
            }
        }
    }
    out
}

fn upsample<T: Copy>(src: &[T], s: Shape, d: Shape, f: u16) -> Vec<T> {
    let f = f as usize;
    let mut out = Vec::with_capacity(d.elements() as usize);
    for c in 0..d.c as usize {
        for y in 0..d.h as usize {
            for x in 0..d.w as usize {
                out.push(src[(c * s.h as usize + y / f) * s.w as usize + x / f]);
            }
        }
    }
    out
}

fn argmax<T: Copy + PartialOrd>(src: &[T], s: Shape) -> Vec<usize> {
    let plane = (s.h * s.w) as usize;
    (0..plane)
        .map(|p| {
            let mut best = 0;
            for c in 1..s.c as usize {
                if src[c * plane + p] > src[best * plane + p] {
                    best = c;
                }
            }
            best
        })
        .collect()
}

/// Every node's shape for an `h × w` input, after checking the input has `C·H·W` values.
fn shapes(
    c: &Container<'_>,
    h: u32,
    w: u32,
    input_len: usize,
) -> Result<Vec<Shape>, ReferenceError> {
    let g = c.graph();
    let mut shapes = vec![Shape::default(); g.len()];
    g.infer_shapes(h, w, &mut shapes)?;
    let need = shapes[0].elements() as usize;
    if input_len != need {
        return Err(ReferenceError::Input {
            expected: need,
            found: input_len,
        });
    }
    Ok(shapes)
}

/// Runs a float model (weights `F32` or `F16`) on planar input `x` of `h × w`.
pub fn run_float(c: &Container<'_>, x: &[f32], h: u32, w: u32) -> Result<FloatRun, ReferenceError> {
    let graph: Graph<'_> = c.graph();
    let shapes = shapes(c, h, w, x.len())?;
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(graph.len());
    for (n, op) in graph.nodes().iter().enumerate() {
        let d = shapes[n];
        let inp = op.inputs();
        let src = |k: usize| inp.as_slice()[k] as usize;
        let out = match *op {
            Op::Input { .. } => x.to_vec(),
            Op::Conv2d(_) | Op::ConvTranspose2d(_) => {
                let (bias, relu) = match *op {
                    Op::Conv2d(cv) => (cv.bias, cv.relu),
                    Op::ConvTranspose2d(cv) => (cv.bias, cv.relu),
                    _ => unreachable!("matched above"),
                };
                let wt = float_tensor(c, n, ParamRole::Weight)?;
                let b = if bias {
                    float_tensor(c, n, ParamRole::Bias)?
                } else {
                    vec![0.0; d.c as usize]
                };
                let mut acc: Vec<f32> = (0..d.elements() as usize)
                    .map(|i| b[i / (d.h * d.w) as usize])
                    .collect();
                conv_taps(op, shapes[src(0)], d, |out, _, i, wi, _, _| {
                    acc[out] += wt[wi] * values[src(0)][i]
                });
                if relu {
                    acc.iter_mut()
                        .for_each(|v| *v = if *v > 0.0 { *v } else { 0.0 });
                }
                acc
            }
            Op::BatchNorm { .. } => {
                return Err(model_err(n, "batch norm must be folded before running"))
            }
            Op::Relu { .. } => values[src(0)]
                .iter()
                .map(|&v| if v > 0.0 { v } else { 0.0 })
                .collect(),
            Op::MaxPool { kernel, stride, .. } => {
                window_max(&values[src(0)], shapes[src(0)], d, kernel, stride)
            }
            Op::Upsample { factor, .. } => upsample(&values[src(0)], shapes[src(0)], d, factor),
            Op::Concat { .. } => [values[src(0)].as_slice(), values[src(1)].as_slice()].concat(),
            Op::Add { .. } => values[src(0)]
                .iter()
                .zip(&values[src(1)])
                .map(|(a, b)| a + b)
                .collect(),
            Op::Softmax { .. } => {
                let s = shapes[src(0)];
                let plane = (s.h * s.w) as usize;
                let v = &values[src(0)];
                let mut out = vec![0.0; v.len()];
                for p in 0..plane {
                    let m = (0..s.c as usize)
                        .map(|c| v[c * plane + p])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = (0..s.c as usize)
                        .map(|c| (v[c * plane + p] - m).exp())
                        .sum();
                    for c in 0..s.c as usize {
                        out[c * plane + p] = (v[c * plane + p] - m).exp() / sum;
                    }
                }
                out
            }
            Op::Argmax { .. } => argmax(&values[src(0)], shapes[src(0)])
                .into_iter()
                .map(|c| c as f32)
                .collect(),
        };
        values.push(out);
    }
    Ok(FloatRun { shapes, values })
}

/// Every node's output of an int8 run: `i32` holding int8 values (class indices for
/// arg-max), planar.
pub struct Int8Run {
    /// Output shapes.
    pub shapes: Vec<Shape>,
    /// Output integers per node.
    pub values: Vec<Vec<i32>>,
    /// The `(scale, zero point)` each node's output is expressed in.
    pub params: Vec<(f64, i32)>,
}

fn sat8(v: i64) -> i32 {
    v.clamp(-128, 127) as i32
}

/// `rnd`: round half away from zero to `i32`, saturating, NaN → 0.
fn rnd(v: f32) -> i32 {
    if v.is_nan() {
        0
    } else {
        v.round().clamp(i32::MIN as f32, i32::MAX as f32) as i32
    }
}

fn mult(node: usize, r: f64) -> Result<Requant, ReferenceError> {
    quantize_multiplier(r)
        .ok_or_else(|| model_err(node, format!("multiplier {r} is not representable")))
}

fn reexpress(
    node: usize,
    q: &[i32],
    from: (f64, i32),
    to: (f64, i32),
) -> Result<Vec<i32>, ReferenceError> {
    if from == to {
        return Ok(q.to_vec());
    }
    let m = mult(node, from.0 / to.0)?;
    Ok(q.iter()
        .map(|&v| sat8(i64::from(requantize(v - from.1, m)) + i64::from(to.1)))
        .collect())
}

fn act(c: &Container<'_>, node: usize) -> Option<ActivationQuant> {
    c.header()
        .activations
        .iter()
        .copied()
        .find(|a| a.node as usize == node)
}

/// Runs an int8 model on float input `x` (already normalised) of `h × w`.
pub fn run_int8(c: &Container<'_>, x: &[f32], h: u32, w: u32) -> Result<Int8Run, ReferenceError> {
    let graph = c.graph();
    let shapes = shapes(c, h, w, x.len())?;
    let mut values: Vec<Vec<i32>> = Vec::with_capacity(graph.len());
    let mut params: Vec<(f64, i32)> = Vec::with_capacity(graph.len());
    let required = |n: usize| {
        act(c, n)
            .map(|a| (f64::from(a.scale), a.zero_point))
            .ok_or_else(|| model_err(n, "no activation quantization"))
    };
    for (n, op) in graph.nodes().iter().enumerate() {
        let d = shapes[n];
        let inp = op.inputs();
        let src = |k: usize| inp.as_slice()[k] as usize;
        let (out, p) = match *op {
            Op::Input { .. } => {
                let (s, z) = required(n)?;
                let s32 = s as f32;
                let q = x
                    .iter()
                    .map(|&v| sat8(i64::from(rnd(v / s32)) + i64::from(z)))
                    .collect();
                (q, (s, z))
            }
            Op::Conv2d(_) | Op::ConvTranspose2d(_) => {
                let (relu, bias) = match op {
                    Op::Conv2d(cv) => (cv.relu, cv.bias),
                    Op::ConvTranspose2d(cv) => (cv.relu, cv.bias),
                    _ => unreachable!("matched above"),
                };
                let (sy, zy) = required(n)?;
                let (sx, zx) = params[src(0)];
                let wi = c
                    .find(n as NodeId, ParamRole::Weight)
                    .ok_or_else(|| model_err(n, "no weight"))?;
                let wq: Vec<i32> = c
                    .tensor_bytes(wi)
                    .unwrap_or(&[])
                    .iter()
                    .map(|&b| i32::from(b as i8))
                    .collect();
                let si = c
                    .find(n as NodeId, ParamRole::WeightScale)
                    .ok_or_else(|| model_err(n, "no weight scale"))?;
                let scales: Vec<f32> = c
                    .tensor_bytes(si)
                    .unwrap_or(&[])
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let b: Vec<i32> = if bias {
                    let bi = c
                        .find(n as NodeId, ParamRole::Bias)
                        .ok_or_else(|| model_err(n, "no bias"))?;
                    c.tensor_bytes(bi)
                        .unwrap_or(&[])
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                } else {
                    vec![0; d.c as usize]
                };
                let plane = (d.h * d.w) as usize;
                let mut acc: Vec<i32> = (0..d.elements() as usize).map(|i| b[i / plane]).collect();
                let xin = &values[src(0)];
                conv_taps(op, shapes[src(0)], d, |out, _, i, wi, _, _| {
                    acc[out] = acc[out].wrapping_add((xin[i] - zx).wrapping_mul(wq[wi]));
                });
                let ms = (0..d.c as usize)
                    .map(|o| mult(n, sx * f64::from(scales[o]) / sy))
                    .collect::<Result<Vec<_>, _>>()?;
                let q = acc
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| {
                        let v = sat8(i64::from(requantize(a, ms[i / plane])) + i64::from(zy));
                        if relu {
                            v.max(zy)
                        } else {
                            v
                        }
                    })
                    .collect();
                (q, (sy, zy))
            }
            Op::BatchNorm { .. } => {
                return Err(model_err(n, "batch norm must be folded before running"))
            }
            Op::Relu { .. } | Op::MaxPool { .. } | Op::Upsample { .. } => {
                let from = params[src(0)];
                let to = act(c, n)
                    .map(|a| (f64::from(a.scale), a.zero_point))
                    .unwrap_or(from);
                let v = &values[src(0)];
                let raw = match *op {
                    Op::Relu { .. } => v.iter().map(|&q| q.max(from.1)).collect(),
                    Op::MaxPool { kernel, stride, .. } => {
                        window_max(v, shapes[src(0)], d, kernel, stride)
                    }
                    Op::Upsample { factor, .. } => upsample(v, shapes[src(0)], d, factor),
                    _ => unreachable!("matched above"),
                };
                (reexpress(n, &raw, from, to)?, to)
            }
            Op::Concat { .. } => {
                let to = required(n)?;
                let a = reexpress(n, &values[src(0)], params[src(0)], to)?;
                let b = reexpress(n, &values[src(1)], params[src(1)], to)?;
                ([a, b].concat(), to)
            }
            Op::Add { .. } => {
                let (sy, zy) = required(n)?;
                let (pa, pb) = (params[src(0)], params[src(1)]);
                let ma = mult(n, pa.0 / sy * 65536.0)?;
                let mb = mult(n, pb.0 / sy * 65536.0)?;
                let q = values[src(0)]
                    .iter()
                    .zip(&values[src(1)])
                    .map(|(&a, &b)| {
                        let ta = i64::from(requantize(a - pa.1, ma));
                        let tb = i64::from(requantize(b - pb.1, mb));
                        sat8(((ta + tb + 32768) >> 16) + i64::from(zy))
                    })
                    .collect();
                (q, (sy, zy))
            }
            Op::Softmax { .. } => {
                let (sx, zx) = params[src(0)];
                let s = shapes[src(0)];
                let plane = (s.h * s.w) as usize;
                let v: Vec<f32> = values[src(0)]
                    .iter()
                    .map(|&q| sx as f32 * (q - zx) as f32)
                    .collect();
                let mut out = vec![0; v.len()];
                for p in 0..plane {
                    let m = (0..s.c as usize)
                        .map(|c| v[c * plane + p])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = (0..s.c as usize)
                        .map(|c| libm_expf(v[c * plane + p] - m))
                        .sum();
                    for c in 0..s.c as usize {
                        let prob = libm_expf(v[c * plane + p] - m) / sum;
                        out[c * plane + p] = sat8(i64::from(rnd(prob * 256.0)) - 128);
                    }
                }
                (out, (1.0 / 256.0, -128))
            }
            Op::Argmax { .. } => {
                let cls = argmax(&values[src(0)], shapes[src(0)])
                    .into_iter()
                    .map(|c| c as i32)
                    .collect();
                (cls, (1.0, 0))
            }
        };
        values.push(out);
        params.push(p);
    }
    Ok(Int8Run {
        shapes,
        values,
        params,
    })
}

/// The device's `expf`, so int8 softmax agrees bit for bit.
fn libm_expf(x: f32) -> f32 {
    libm::expf(x)
}
