//! Post-training int8 quantization (semantics in `shared/FORMAT.md`).
//!
//! * Weights: symmetric per output channel, `scale[o] = max |w[o]| / 127`,
//!   `q = round(w / scale[o])`.
//! * Activations: one asymmetric `(scale, zero point)` per tensor from the range seen on
//!   calibration images (the range always includes 0, so zero padding is exact):
//!   `scale = (max − min) / 255`, `zero = round(−128 − min / scale)`. Nodes that only move
//!   values (ReLU, max-pool, upsample) inherit their input's parameters.
//! * Biases: `i32` `round(b / (s_in · scale[o]))`.

use ccnet_shared::format::{ActivationQuant, Container, DType};
use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole};

use super::reference::{run_float, ReferenceError};
use super::{tensor_metas, FloatModel, PackError, PackInfo, Quant};
use crate::container::{write, ModelSpec, TensorData};
use crate::weights::key;

/// Per-node value ranges seen on calibration inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranges {
    /// `(min, max)` per node.
    pub per_node: Vec<(f32, f32)>,
    /// Inputs seen.
    pub samples: usize,
}

/// Runs the float model on every calibration input (planar, normalised, `h × w` each)
/// and records each node's output range.
pub fn measure_ranges(
    model: &FloatModel,
    info: &PackInfo<'_>,
    inputs: &[(Vec<f32>, u32, u32)],
) -> Result<Ranges, PackError> {
    let bytes = super::pack(model, Quant::F32, None, info)?;
    let c = Container::parse(&bytes)
        .map_err(|e| PackError::Write(crate::container::WriteError::Invalid(e)))?;
    let mut per_node = vec![(f32::INFINITY, f32::NEG_INFINITY); model.graph.len()];
    for (x, h, w) in inputs {
        let run = run_float(&c, x, *h, *w).map_err(PackError::Reference)?;
        for (r, v) in per_node.iter_mut().zip(&run.values) {
            for &x in v {
                r.0 = r.0.min(x);
                r.1 = r.1.max(x);
            }
        }
    }
    Ok(Ranges {
        per_node,
        samples: inputs.len(),
    })
}

/// `(scale, zero point)` covering `[min, max] ∪ {0}` with 256 levels.
pub fn activation_params(min: f32, max: f32) -> (f32, i32) {
    let lo = f64::from(min.min(0.0));
    let mut hi = f64::from(max.max(0.0));
    if !(lo.is_finite() && hi.is_finite()) {
        return (1.0, 0);
    }
    if hi - lo < 1e-6 {
        hi = lo + 1e-6;
    }
    let scale = (hi - lo) / 255.0;
    let zero = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i32;
    (scale as f32, zero)
}

/// The nodes that carry their own activation quantization.
pub fn quantized_nodes(graph: &[Op]) -> impl Iterator<Item = NodeId> + '_ {
    graph
        .iter()
        .enumerate()
        .filter(|(_, op)| needs_params(op))
        .map(|(n, _)| n as NodeId)
}

fn needs_params(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. }
            | Op::Conv2d(_)
            | Op::ConvTranspose2d(_)
            | Op::Concat { .. }
            | Op::Add { .. }
    )
}

/// Quantizes a deployed float model to int8 with the given activation ranges and
/// writes the container.
pub fn pack_int8(
    model: &FloatModel,
    info: &PackInfo<'_>,
    ranges: &Ranges,
) -> Result<Vec<u8>, PackError> {
    let graph = &model.graph;
    let g = Graph::new_unchecked(graph);
    crate::weights::check_complete(graph, &model.weights)?;
    // Activation parameters, and the effective input scale of every node.
    let mut acts = Vec::new();
    let mut effective: Vec<f64> = Vec::with_capacity(graph.len());
    for (n, op) in graph.iter().enumerate() {
        if needs_params(op) {
            let (lo, hi) = ranges.per_node[n];
            let (scale, zero_point) = activation_params(lo, hi);
            acts.push(ActivationQuant {
                node: n as NodeId,
                scale,
                zero_point,
            });
            effective.push(f64::from(scale));
        } else {
            let src = op
                .inputs()
                .as_slice()
                .first()
                .map(|&i| effective[i as usize]);
            effective.push(src.unwrap_or(1.0));
        }
    }
    let mut tensors = Vec::new();
    for m in tensor_metas(graph, Quant::Int8)? {
        let n = m.node as usize;
        let op = &graph[n];
        let wname = key(&g, m.node, ParamRole::Weight).unwrap_or_default();
        let w = &model.weights[&wname].values;
        let (out, kk) = match op {
            Op::Conv2d(c) => (c.out_channels as usize, (c.kernel as usize).pow(2)),
            Op::ConvTranspose2d(c) => (c.out_channels as usize, (c.kernel as usize).pow(2)),
            _ => unreachable!("only convolutions have weights"),
        };
        let channel_of = |j: usize| match op {
            Op::Conv2d(_) => j / (w.len() / out),
            _ => (j / kk) % out,
        };
        let mut max_abs = vec![0f32; out];
        for (j, &v) in w.iter().enumerate() {
            let o = channel_of(j);
            max_abs[o] = max_abs[o].max(v.abs());
        }
        let scales: Vec<f32> = max_abs
            .iter()
            .map(|&a| {
                if a > 0.0 && a.is_finite() {
                    a / 127.0
                } else {
                    1.0
                }
            })
            .collect();
        let bytes = match m.role {
            ParamRole::Weight => w
                .iter()
                .enumerate()
                .map(|(j, &v)| (v / scales[channel_of(j)]).round().clamp(-127.0, 127.0) as i8 as u8)
                .collect(),
            ParamRole::WeightScale => scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ParamRole::Bias => {
                let bname = key(&g, m.node, ParamRole::Bias).unwrap_or_default();
                let b = &model.weights[&bname].values;
                let s_in = effective[op.inputs().as_slice()[0] as usize];
                b.iter()
                    .enumerate()
                    .flat_map(|(o, &v)| {
                        let q = (f64::from(v) / (s_in * f64::from(scales[o])))
                            .round()
                            .clamp(f64::from(i32::MIN), f64::from(i32::MAX))
                            as i32;
                        q.to_le_bytes()
                    })
                    .collect()
            }
            _ => unreachable!("convolutions have weight, scale and bias"),
        };
        debug_assert!(m.dtype != DType::F16);
        tensors.push(TensorData {
            node: m.node,
            role: m.role,
            dtype: m.dtype,
            dims: m.dims,
            bytes,
        });
    }
    let spec = ModelSpec {
        graph,
        activations: &acts,
        input: info.input,
        metadata: info.metadata,
    };
    Ok(write(&spec, &tensors)?)
}

impl From<ReferenceError> for PackError {
    fn from(e: ReferenceError) -> Self {
        PackError::Reference(e)
    }
}
