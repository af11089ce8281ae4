//! Graph rewrites done before quantizing: batch norm folded into the preceding
//! convolution's weights and bias, and a ReLU that is a convolution's only reader fused
//! into that convolution.
//!
//! Folding `y = γ · (conv(x) + b − μ) / √(σ² + ε) + β` gives a convolution with weights
//! `w'[o] = w[o] · γ[o] / √(σ²[o] + ε)` and bias `b'[o] = (b[o] − μ[o]) · γ[o] / √(σ²[o] + ε) + β[o]`.
//! Convolution ordinals do not change, so the parameter names of the convolutions
//! (`conv07.weight`) are the same before and after.

use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole};

use crate::weights::{key, FloatTensor, WeightMap};

/// A float network ready to quantize: graph and weights by stable name.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatModel {
    /// The graph.
    pub graph: Vec<Op>,
    /// The weights.
    pub weights: WeightMap,
}

/// Why a rewrite failed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// A batch norm reads something other than a convolution that only it reads.
    #[error("batch norm at node {node} does not directly follow a convolution it alone reads; it cannot be folded")]
    Unfoldable {
        /// The batch-norm node.
        node: NodeId,
    },
    /// A weight is missing or has the wrong size.
    #[error("{0}")]
    Weights(#[from] crate::weights::WeightsError),
}

pub(crate) fn readers(graph: &[Op]) -> Vec<usize> {
    let mut count = vec![0; graph.len()];
    for op in graph {
        for &i in op.inputs().as_slice() {
            count[i as usize] += 1;
        }
    }
    count
}

pub(crate) fn remap_inputs(op: Op, map: &[NodeId]) -> Op {
    let m = |i: NodeId| map[i as usize];
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

fn get<'a>(
    weights: &'a WeightMap,
    graph: &Graph<'_>,
    node: NodeId,
    role: ParamRole,
) -> Result<&'a FloatTensor, FoldError> {
    let name = key(graph, node, role).unwrap_or_default();
    weights
        .get(&name)
        .ok_or(FoldError::Weights(crate::weights::WeightsError::Missing {
            name,
            node,
        }))
}

/// Folds every batch norm into the convolution before it. The result has no
/// [`Op::BatchNorm`] nodes and every folded convolution has a bias.
pub fn fold_batch_norm(model: &FloatModel) -> Result<FloatModel, FoldError> {
    let old = Graph::new_unchecked(&model.graph);
    crate::weights::check_complete(&model.graph, &model.weights)?;
    let reads = readers(&model.graph);
    let mut nodes: Vec<Op> = Vec::with_capacity(model.graph.len());
    let mut map: Vec<NodeId> = Vec::with_capacity(model.graph.len());
    // Per new node: the (scale, shift) to apply to the old convolution's weights.
    let mut folds: Vec<Option<(Vec<f32>, Vec<f32>)>> = Vec::new();
    for (i, op) in model.graph.iter().enumerate() {
        let node = i as NodeId;
        if let Op::BatchNorm { input, eps, .. } = *op {
            let src = input as usize;
            let is_conv = matches!(model.graph[src], Op::Conv2d(_) | Op::ConvTranspose2d(_));
            if !is_conv || reads[src] != 1 {
                return Err(FoldError::Unfoldable { node });
            }
            let gamma = &get(&model.weights, &old, node, ParamRole::Gamma)?.values;
            let beta = &get(&model.weights, &old, node, ParamRole::Beta)?.values;
            let mean = &get(&model.weights, &old, node, ParamRole::RunningMean)?.values;
            let var = &get(&model.weights, &old, node, ParamRole::RunningVar)?.values;
            let scale: Vec<f32> = gamma
                .iter()
                .zip(var)
                .map(|(&g, &v)| (f64::from(g) / (f64::from(v) + f64::from(eps)).sqrt()) as f32)
                .collect();
            let shift: Vec<f32> = (0..scale.len())
                .map(|o| beta[o] - mean[o] * scale[o])
                .collect();
            let target = map[src] as usize;
            folds[target] = Some((scale, shift));
            match &mut nodes[target] {
                Op::Conv2d(c) => c.bias = true,
                Op::ConvTranspose2d(c) => c.bias = true,
                _ => unreachable!("checked to be a convolution"),
            }
            map.push(map[src]);
            continue;
        }
        map.push(nodes.len() as NodeId);
        nodes.push(remap_inputs(*op, &map));
        folds.push(None);
    }
    // Weights: convolutions keep their names (ordinals are unchanged).
    let new = Graph::new_unchecked(&nodes);
    let mut weights = WeightMap::new();
    let old_of_new: Vec<usize> = {
        let mut v = vec![usize::MAX; nodes.len()];
        for (o, &n) in map.iter().enumerate() {
            if v[n as usize] == usize::MAX {
                v[n as usize] = o;
            }
        }
        v
    };
    for (n, op) in nodes.iter().enumerate() {
        let node = n as NodeId;
        let old_node = old_of_new[n] as NodeId;
        if op.param_tensors().as_slice().is_empty() {
            continue;
        }
        let w = get(&model.weights, &old, old_node, ParamRole::Weight)?;
        let wkey = key(&new, node, ParamRole::Weight).unwrap_or_default();
        let bkey = key(&new, node, ParamRole::Bias).unwrap_or_default();
        let old_bias = key(&old, old_node, ParamRole::Bias)
            .and_then(|k| model.weights.get(&k))
            .map(|t| t.values.clone());
        match &folds[n] {
            None => {
                weights.insert(wkey, w.clone());
                if let Some(b) = old_bias {
                    weights.insert(
                        bkey,
                        FloatTensor {
                            dims: vec![b.len()],
                            values: b,
                        },
                    );
                }
            }
            Some((scale, shift)) => {
                let out = scale.len();
                let mut values = w.values.clone();
                match op {
                    Op::Conv2d(_) => {
                        let per = values.len() / out;
                        for (o, chunk) in values.chunks_mut(per).enumerate() {
                            chunk.iter_mut().for_each(|v| *v *= scale[o]);
                        }
                    }
                    Op::ConvTranspose2d(c) => {
                        let kk = (c.kernel as usize) * (c.kernel as usize);
                        for (j, v) in values.iter_mut().enumerate() {
                            *v *= scale[(j / kk) % out];
                        }
                    }
                    _ => unreachable!("only convolutions are folded"),
                }
                let bias: Vec<f32> = (0..out)
                    .map(|o| old_bias.as_ref().map_or(0.0, |b| b[o]) * scale[o] + shift[o])
                    .collect();
                weights.insert(
                    wkey,
                    FloatTensor {
                        dims: w.dims.clone(),
                        values,
                    },
                );
                weights.insert(
                    bkey,
                    FloatTensor {
                        dims: vec![out],
                        values: bias,
                    },
                );
            }
        }
    }
    Ok(FloatModel {
        graph: nodes,
        weights,
    })
}

/// Parameters of a training graph once its batch norms are folded: every batch norm's
/// `γ, β` go, and the convolution before it gains a bias if it had none.
pub fn deployed_params(graph: &[Op]) -> u64 {
    let mut p = Graph::new_unchecked(graph).trainable_params();
    for op in graph {
        if let Op::BatchNorm {
            input, channels, ..
        } = *op
        {
            p -= 2 * u64::from(channels);
            let bias = match graph.get(input as usize) {
                Some(Op::Conv2d(c)) => c.bias,
                Some(Op::ConvTranspose2d(c)) => c.bias,
                _ => true,
            };
            if !bias {
                p += u64::from(channels);
            }
        }
    }
    p
}

/// Fuses a ReLU into the convolution it reads when that convolution has no other
/// reader. Weights are unchanged (convolution ordinals do not change).
pub fn fuse_relu(model: &FloatModel) -> FloatModel {
    let reads = readers(&model.graph);
    let mut nodes: Vec<Op> = Vec::with_capacity(model.graph.len());
    let mut map: Vec<NodeId> = Vec::with_capacity(model.graph.len());
    for op in model.graph.iter() {
        if let Op::Relu { input } = *op {
            let src = input as usize;
            if reads[src] == 1 {
                let target = map[src] as usize;
                let fused = match &mut nodes[target] {
                    Op::Conv2d(c) if !c.relu => {
                        c.relu = true;
                        true
                    }
                    Op::ConvTranspose2d(c) if !c.relu => {
                        c.relu = true;
                        true
                    }
                    _ => false,
                };
                if fused {
                    map.push(map[src]);
                    continue;
                }
            }
        }
        map.push(nodes.len() as NodeId);
        nodes.push(remap_inputs(*op, &map));
    }
    FloatModel {
        graph: nodes,
        weights: model.weights.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccnet_models::{build, Arch, ArchConfig};
    use ccnet_shared::alpha::Alpha;

    fn random_weights(graph: &[Op], seed: u64) -> WeightMap {
        let g = Graph::new_unchecked(graph);
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut w = WeightMap::new();
        for (n, op) in graph.iter().enumerate() {
            for &(role, dims) in op.param_tensors().as_slice() {
                let count = dims.iter().product::<u32>() as usize;
                let values = (0..count)
                    .map(|_| {
                        let v = next();
                        if role == ParamRole::RunningVar {
                            v + 1.0
                        } else {
                            v
                        }
                    })
                    .collect();
                w.insert(
                    key(&g, n as NodeId, role).unwrap(),
                    FloatTensor {
                        dims: dims.iter().map(|&d| d as usize).collect(),
                        values,
                    },
                );
            }
        }
        w
    }

    #[test]
    fn folded_graph_is_the_plain_graph_with_fused_relus() {
        for arch in Arch::ALL {
            let alpha = Alpha::new(1, 16).unwrap();
            let bn = build(&ArchConfig {
                batch_norm: true,
                ..ArchConfig::new(arch, alpha)
            })
            .unwrap();
            let plain = build(&ArchConfig::new(arch, alpha)).unwrap();
            let model = FloatModel {
                weights: random_weights(&bn, 3),
                graph: bn,
            };
            let folded = fold_batch_norm(&model).unwrap();
            assert_eq!(folded.graph, plain, "{arch}");
            crate::weights::check_complete(&folded.graph, &folded.weights).unwrap();
            let fused = fuse_relu(&folded);
            assert!(fused.graph.iter().all(|o| !matches!(o, Op::Relu { .. })));
            assert_eq!(
                Graph::new(&fused.graph).unwrap().trainable_params(),
                Graph::new(&plain).unwrap().trainable_params()
            );
            assert_eq!(
                deployed_params(&model.graph),
                Graph::new(&plain).unwrap().trainable_params(),
                "{arch}"
            );
        }
    }

    #[test]
    fn folding_one_channel_matches_the_formula() {
        let graph = vec![
            Op::Input { channels: 1 },
            Op::Conv2d(ccnet_shared::graph::Conv2d {
                input: 0,
                in_channels: 1,
                out_channels: 1,
                kernel: 1,
                stride: 1,
                padding: 0,
                dilation: 1,
                bias: false,
                relu: false,
            }),
            Op::BatchNorm {
                input: 1,
                channels: 1,
                eps: 0.0,
            },
        ];
        let t = |v: f32| FloatTensor {
            dims: vec![1],
            values: vec![v],
        };
        let mut w = WeightMap::new();
        w.insert("conv00.weight".into(), t(2.0));
        w.insert("bn00.gamma".into(), t(3.0));
        w.insert("bn00.beta".into(), t(0.5));
        w.insert("bn00.running_mean".into(), t(1.0));
        w.insert("bn00.running_var".into(), t(4.0));
        let f = fold_batch_norm(&FloatModel { graph, weights: w }).unwrap();
        // y = 3 · (2x − 1) / 2 + 0.5 = 3x − 1
        assert_eq!(f.weights["conv00.weight"].values, vec![3.0]);
        assert_eq!(f.weights["conv00.bias"].values, vec![-1.0]);
    }

    #[test]
    fn unfoldable_batch_norm_is_an_error() {
        let graph = vec![
            Op::Input { channels: 1 },
            Op::BatchNorm {
                input: 0,
                channels: 1,
                eps: 1e-5,
            },
        ];
        let mut w = WeightMap::new();
        for r in ["gamma", "beta", "running_mean", "running_var"] {
            w.insert(
                format!("bn00.{r}"),
                FloatTensor {
                    dims: vec![1],
                    values: vec![1.0],
                },
            );
        }
        assert!(matches!(
            fold_batch_norm(&FloatModel { graph, weights: w }),
            Err(FoldError::Unfoldable { node: 1 })
        ));
    }
}
