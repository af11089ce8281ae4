//! The "prune" baseline: filter pruning that physically removes channels (Li et al.
//! 2017, "Pruning filters for efficient ConvNets"; the iterative prune + fine-tune loop
//! of Han et al. / Molchanov et al. lives in the experiment driver).
//!
//! Every channel of every node is traced to the filter that produced it (a convolution
//! or transposed convolution, through batch norm, ReLU, pooling, upsampling and
//! concatenation), so removing a filter removes its output channel, the matching entries
//! of any batch norm after it, and the matching input slice of **every** convolution that
//! reads it, including the decoder convolutions behind a U-Net skip concatenation
//! (where the channel sits at an offset). Filters whose channels reach the network output
//! or an element-wise sum (which would need both operands pruned alike) are not pruned.
//!
//! Filters are ranked by the L1 norm of their weights, scaled by the batch norm that
//! follows (`|γ| / √(σ² + ε)`), since batch norm makes the raw weight norm meaningless.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Result};
use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole};

use crate::pack::fold::readers;
use crate::train::executor::logits_node;
use crate::weights::{check_complete, key, FloatTensor, WeightMap};

/// The filter that produced a channel: (producer node, filter index).
type Origin = (NodeId, u32);

/// The origin of every channel of every node.
fn channel_origins(graph: &[Op]) -> Result<Vec<Vec<Origin>>> {
    let mut origins: Vec<Vec<Origin>> = Vec::with_capacity(graph.len());
    for (id, op) in graph.iter().enumerate() {
        let id = id as NodeId;
        let of = |n: NodeId| -> Result<&Vec<Origin>> {
            origins
                .get(n as usize)
                .ok_or_else(|| anyhow!("node {id} reads node {n}, which comes later"))
        };
        let own = |c: u32| (0..c).map(|j| (id, j)).collect::<Vec<_>>();
        let o = match *op {
            Op::Input { channels } => own(channels),
            Op::Conv2d(c) => own(c.out_channels),
            Op::ConvTranspose2d(c) => own(c.out_channels),
            Op::BatchNorm { input, .. }
            | Op::Relu { input }
            | Op::MaxPool { input, .. }
            | Op::Upsample { input, .. }
            | Op::Softmax { input } => of(input)?.clone(),
            Op::Argmax { .. } => vec![(id, 0)],
            Op::Concat { a, b } => {
                let mut v = of(a)?.clone();
                v.extend(of(b)?.iter().copied());
                v
            }
            Op::Add { a, .. } => of(a)?.clone(),
        };
        origins.push(o);
    }
    Ok(origins)
}

/// The filter-producing nodes whose filters may be removed.
pub fn prunable(graph: &[Op]) -> Result<Vec<NodeId>> {
    if graph.is_empty() {
        bail!("empty graph");
    }
    let origins = channel_origins(graph)?;
    let mut fixed: BTreeSet<NodeId> = BTreeSet::new();
    fixed.extend(origins[logits_node(graph)].iter().map(|o| o.0));
    for op in graph {
        if let Op::Add { a, b } = *op {
            fixed.extend(origins[a as usize].iter().map(|o| o.0));
            fixed.extend(origins[b as usize].iter().map(|o| o.0));
        }
        // Class scores up-sampled on their way to the output (FCN-8s, CUMedVision):
        // the score convolution's channels are classes too.
        if let Op::ConvTranspose2d(c) = *op {
            if crate::train::init::is_score_upsampling(op) {
                fixed.extend(origins[c.input as usize].iter().map(|o| o.0));
            }
        }
    }
    Ok(graph
        .iter()
        .enumerate()
        .filter(|(id, op)| {
            let out = match op {
                Op::Conv2d(c) => c.out_channels,
                Op::ConvTranspose2d(c) => c.out_channels,
                _ => 0,
            };
            out >= 2 && !fixed.contains(&(*id as NodeId))
        })
        .map(|(id, _)| id as NodeId)
        .collect())
}

fn tensor<'a>(
    weights: &'a WeightMap,
    g: &Graph<'_>,
    node: NodeId,
    role: ParamRole,
) -> Result<&'a FloatTensor> {
    let name = key(g, node, role).unwrap_or_default();
    weights
        .get(&name)
        .ok_or_else(|| anyhow!("weights lack tensor `{name}` (node {node})"))
}

/// Importance of each filter of `node`: the L1 norm of its weights, times the scale of
/// the batch norm that alone reads it (if any).
pub fn filter_scores(graph: &[Op], weights: &WeightMap, node: NodeId) -> Result<Vec<f64>> {
    let g = Graph::new_unchecked(graph);
    let w = tensor(weights, &g, node, ParamRole::Weight)?;
    let (out, transposed) = match graph[node as usize] {
        Op::Conv2d(c) => (c.out_channels as usize, false),
        Op::ConvTranspose2d(c) => (c.out_channels as usize, true),
        _ => bail!("node {node} has no filters"),
    };
    let mut score = vec![0f64; out];
    if transposed {
        // [in, out, k, k]
        let kk: usize = w.dims[2..].iter().product();
        for chunk in w.values.chunks(out * kk) {
            for (o, s) in score.iter_mut().enumerate() {
                *s += chunk[o * kk..(o + 1) * kk]
                    .iter()
                    .map(|v| f64::from(v.abs()))
                    .sum::<f64>();
            }
        }
    } else {
        // [out, in, k, k]
        let per = w.values.len() / out;
        for (o, s) in score.iter_mut().enumerate() {
            *s = w.values[o * per..(o + 1) * per]
                .iter()
                .map(|v| f64::from(v.abs()))
                .sum();
        }
    }
    let reads = readers(graph);
    let next = node as usize + 1;
    if reads[node as usize] == 1 {
        if let Some(Op::BatchNorm { input, eps, .. }) = graph.get(next) {
            if *input == node {
                let id = next as NodeId;
                let gamma = tensor(weights, &g, id, ParamRole::Gamma)?;
                let var = tensor(weights, &g, id, ParamRole::RunningVar)?;
                for (o, s) in score.iter_mut().enumerate() {
                    *s *= f64::from(gamma.values[o].abs())
                        / (f64::from(var.values[o]) + f64::from(*eps)).sqrt();
                }
            }
        }
    }
    Ok(score)
}

/// Picks, for every prunable node, the `round(fraction · filters)` filters with the
/// lowest scores (at least one filter always stays).
pub fn choose_filters(
    graph: &[Op],
    weights: &WeightMap,
    fraction: f64,
) -> Result<BTreeMap<NodeId, Vec<u32>>> {
    if !(0.0..1.0).contains(&fraction) {
        bail!("the pruning fraction per round must be in [0, 1), got {fraction}");
    }
    check_complete(graph, weights)?;
    let mut remove = BTreeMap::new();
    for node in prunable(graph)? {
        let scores = filter_scores(graph, weights, node)?;
        let n = scores.len();
        let k = ((fraction * n as f64).round() as usize).min(n - 1);
        if k == 0 {
            continue;
        }
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| {
            scores[a as usize]
                .total_cmp(&scores[b as usize])
                .then(a.cmp(&b))
        });
        let mut chosen = order[..k].to_vec();
        chosen.sort_unstable();
        remove.insert(node, chosen);
    }
    Ok(remove)
}

/// Keeps the elements of a row-major tensor whose index on `axis` is in `keep`.
fn select_axis(t: &FloatTensor, axis: usize, keep: &[usize]) -> FloatTensor {
    let outer: usize = t.dims[..axis].iter().product();
    let inner: usize = t.dims[axis + 1..].iter().product();
    let n = t.dims[axis];
    let mut values = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let start = (o * n + k) * inner;
            values.extend_from_slice(&t.values[start..start + inner]);
        }
    }
    let mut dims = t.dims.clone();
    dims[axis] = keep.len();
    FloatTensor { dims, values }
}

/// Removes the filters in `remove` (node → filter indices) from `graph` and `weights`:
/// their output channels, the batch-norm entries behind them, and the input slices of
/// every convolution that reads them. Node order and kinds do not change, so tensor
/// names stay the same.
pub fn remove_filters(
    graph: &[Op],
    weights: &WeightMap,
    remove: &BTreeMap<NodeId, Vec<u32>>,
) -> Result<(Vec<Op>, WeightMap)> {
    check_complete(graph, weights)?;
    let allowed: BTreeSet<NodeId> = prunable(graph)?.into_iter().collect();
    for (node, filters) in remove {
        if !allowed.contains(node) {
            bail!("node {node} cannot be pruned (no filters, or they reach the output or a sum)");
        }
        let n = match graph[*node as usize] {
            Op::Conv2d(c) => c.out_channels,
            Op::ConvTranspose2d(c) => c.out_channels,
            _ => 0,
        };
        let set: BTreeSet<u32> = filters.iter().copied().collect();
        if set.len() != filters.len() || set.iter().any(|&f| f >= n) || set.len() as u32 >= n {
            bail!("node {node}: invalid filters to remove {filters:?} of {n}");
        }
    }
    let sets: BTreeMap<NodeId, BTreeSet<u32>> = remove
        .iter()
        .map(|(n, f)| (*n, f.iter().copied().collect()))
        .collect();
    let removed = |o: &Origin| sets.get(&o.0).is_some_and(|f| f.contains(&o.1));
    let origins = channel_origins(graph)?;
    // Positions kept in every node's output.
    let kept: Vec<Vec<usize>> = origins
        .iter()
        .map(|os| {
            os.iter()
                .enumerate()
                .filter(|(_, o)| !removed(o))
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    let old = Graph::new_unchecked(graph);
    let mut nodes = graph.to_vec();
    let mut out = WeightMap::new();
    for (id, op) in nodes.iter_mut().enumerate() {
        let node = id as NodeId;
        let name = |role| key(&old, node, role).unwrap_or_default();
        let get = |role| tensor(weights, &old, node, role);
        let transposed = matches!(op, Op::ConvTranspose2d(_));
        match op {
            Op::Conv2d(ccnet_shared::graph::Conv2d {
                input,
                in_channels,
                out_channels,
                bias,
                ..
            })
            | Op::ConvTranspose2d(ccnet_shared::graph::ConvTranspose2d {
                input,
                in_channels,
                out_channels,
                bias,
                ..
            }) => {
                let ins = &kept[*input as usize];
                let outs = &kept[id];
                *in_channels = ins.len() as u32;
                *out_channels = outs.len() as u32;
                // Weights are [out, in, k, k], or [in, out, k, k] when transposed.
                let (first, second) = if transposed { (ins, outs) } else { (outs, ins) };
                let w = select_axis(&select_axis(get(ParamRole::Weight)?, 0, first), 1, second);
                out.insert(name(ParamRole::Weight), w);
                if *bias {
                    out.insert(
                        name(ParamRole::Bias),
                        select_axis(get(ParamRole::Bias)?, 0, outs),
                    );
                }
            }
            Op::BatchNorm { channels, .. } => {
                let keep = &kept[id];
                *channels = keep.len() as u32;
                for role in [
                    ParamRole::Gamma,
                    ParamRole::Beta,
                    ParamRole::RunningMean,
                    ParamRole::RunningVar,
                ] {
                    out.insert(name(role), select_axis(get(role)?, 0, keep));
                }
            }
            _ => {}
        }
    }
    Graph::new_with_scratch(&nodes, &mut vec![0; nodes.len()])
        .map_err(|e| anyhow!("internal error: the pruned graph is invalid: {e}"))?;
    check_complete(&nodes, &out)?;
    Ok((nodes, out))
}

/// One pruning round: ranks filters and removes `fraction` of every prunable layer's.
/// Returns the pruned graph and weights and how many filters were removed.
pub fn prune_round(
    graph: &[Op],
    weights: &WeightMap,
    fraction: f64,
) -> Result<(Vec<Op>, WeightMap, usize)> {
    let remove = choose_filters(graph, weights, fraction)?;
    let n = remove.values().map(Vec::len).sum();
    let (g, w) = remove_filters(graph, weights, &remove)?;
    Ok((g, w, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::executor::Network;
    use crate::train::rng::Rng;
    use candle_core::{Device, Tensor};
    use ccnet_models::{build, Arch, ArchConfig};
    use ccnet_shared::alpha::Alpha;

    fn network(arch: Arch, alpha: &str, bn: bool) -> (Vec<Op>, WeightMap) {
        let cfg = ArchConfig {
            batch_norm: bn,
            ..ArchConfig::new(arch, Alpha::parse(alpha).unwrap())
        };
        let g = build(&cfg).unwrap();
        let net = Network::new(&g, &Device::Cpu, &mut Rng::new(7, 1)).unwrap();
        let mut w = WeightMap::new();
        let mut rng = Rng::new(3, 3);
        for (name, t) in net.tensors() {
            let dims = t.dims().to_vec();
            let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if name.ends_with("bias") || name.ends_with("beta") || name.ends_with("running_mean") {
                // Non-zero, so a wrong slice shows in the outputs.
                values
                    .iter_mut()
                    .for_each(|v| *v = rng.normal() as f32 * 0.1);
            }
            if name.ends_with("gamma") || name.ends_with("running_var") {
                values
                    .iter_mut()
                    .for_each(|v| *v = 0.5 + rng.uniform() as f32);
            }
            w.insert(name, FloatTensor { dims, values });
        }
        (g, w)
    }

    fn logits(g: &[Op], w: &WeightMap, side: usize) -> Vec<f32> {
        let dev = Device::Cpu;
        let net = Network::new(g, &dev, &mut Rng::new(0, 0)).unwrap();
        let ts = w
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    Tensor::from_vec(t.values.clone(), t.dims.clone(), &dev).unwrap(),
                )
            })
            .collect();
        net.load(&ts, "test").unwrap();
        let mut rng = Rng::new(5, 5);
        let x: Vec<f32> = (0..side * side).map(|_| rng.normal() as f32).collect();
        let x = Tensor::from_vec(x, (1, 1, side, side), &dev).unwrap();
        net.forward(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn pruning_at_ratio_zero_is_the_identity() {
        for arch in Arch::ALL {
            let (g, w) = network(arch, "1/16", true);
            let (g2, w2, n) = prune_round(&g, &w, 0.0).unwrap();
            assert_eq!(n, 0);
            assert_eq!(g2, g, "{arch}");
            assert_eq!(w2, w, "{arch}");
        }
    }

    #[test]
    fn pruned_networks_keep_valid_shapes_for_every_architecture() {
        for arch in Arch::ALL {
            for bn in [false, true] {
                let (g, w) = network(arch, "1/16", bn);
                let (g2, w2, n) = prune_round(&g, &w, 0.3).unwrap();
                assert!(n > 0, "{arch}");
                let p0 = Graph::new_unchecked(&g).trainable_params();
                let p1 = Graph::new_unchecked(&g2).trainable_params();
                assert!(p1 < p0, "{arch}: {p1} >= {p0}");
                let side = arch.input_multiple() as usize * 2;
                let a = logits(&g, &w, side);
                let b = logits(&g2, &w2, side);
                assert_eq!(a.len(), b.len(), "{arch}: output shape changed");
                // A second round on the pruned network works too.
                prune_round(&g2, &w2, 0.3).unwrap();
            }
        }
    }

    /// Filters that output exactly zero can be removed without changing the network's
    /// function: a test of every channel offset, across U-Net skip concatenations too.
    #[test]
    fn removing_dead_filters_leaves_the_unet_output_unchanged() {
        let (g, mut w) = network(Arch::Unet, "1/16", false);
        let old = Graph::new_unchecked(&g);
        let mut remove: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for node in prunable(&g).unwrap() {
            let (n, transposed) = match g[node as usize] {
                Op::Conv2d(c) => (c.out_channels, false),
                Op::ConvTranspose2d(c) => (c.out_channels, true),
                _ => unreachable!(),
            };
            // Kill the first and the last filter of every prunable layer.
            let dead = vec![0, n - 1];
            let wt = w
                .get_mut(&key(&old, node, ParamRole::Weight).unwrap())
                .unwrap();
            let dims = wt.dims.clone();
            let kk = dims[2] * dims[3];
            for (i, v) in wt.values.iter_mut().enumerate() {
                let o = if transposed {
                    (i / kk) % dims[1]
                } else {
                    i / (dims[1] * kk)
                };
                if dead.contains(&(o as u32)) {
                    *v = 0.0;
                }
            }
            let b = w
                .get_mut(&key(&old, node, ParamRole::Bias).unwrap())
                .unwrap();
            for &d in &dead {
                // A negative bias is cut to zero by the ReLU after a convolution; a
                // transposed convolution has no ReLU, so its bias must be zero.
                b.values[d as usize] = if transposed { 0.0 } else { -0.5 };
            }
            remove.insert(node, dead);
        }
        // The transposed convolutions feed the decoder directly (no ReLU): their dead
        // channels are exactly zero because weights and bias are zero.
        let (g2, w2) = remove_filters(&g, &w, &remove).unwrap();
        let a = logits(&g, &w, 32);
        let b = logits(&g2, &w2, 32);
        let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
        }
        let p0 = Graph::new_unchecked(&g).trainable_params();
        let p1 = Graph::new_unchecked(&g2).trainable_params();
        assert!(p1 < p0);
    }

    #[test]
    fn class_score_channels_are_never_pruned() {
        for arch in [Arch::Fcn, Arch::Cumed] {
            let (g, w) = network(arch, "1/16", true);
            for node in prunable(&g).unwrap() {
                let out = match g[node as usize] {
                    Op::Conv2d(c) => c.out_channels,
                    Op::ConvTranspose2d(c) => c.out_channels,
                    _ => 0,
                };
                assert!(
                    out > 2,
                    "{arch}: node {node} with {out} channels is prunable"
                );
            }
            // Even a large fraction leaves the two class channels everywhere.
            let (g2, _, _) = prune_round(&g, &w, 0.5).unwrap();
            for op in &g2 {
                if let Op::ConvTranspose2d(c) = op {
                    assert_eq!((c.in_channels, c.out_channels), (2, 2), "{arch}");
                }
            }
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let (g, w) = network(Arch::Unet, "1/16", true);
        assert!(choose_filters(&g, &w, 1.0).is_err());
        let logits = logits_node(&g) as NodeId;
        let mut r = BTreeMap::new();
        r.insert(logits, vec![0]);
        let e = remove_filters(&g, &w, &r).unwrap_err().to_string();
        assert!(e.contains("cannot be pruned"), "{e}");
        let first = prunable(&g).unwrap()[0];
        let mut r = BTreeMap::new();
        r.insert(first, vec![0, 0]);
        assert!(remove_filters(&g, &w, &r).is_err());
    }
}
