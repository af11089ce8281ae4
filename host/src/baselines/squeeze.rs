//! The "squeeze" baseline: SqueezeNet fire modules (Iandola et al. 2016) in place of the
//! hidden 3×3 convolutions of any graph.
//!
//! A hidden layer `conv3×3(C_in → C) [→ batch norm] → ReLU` becomes
//!
//! ```text
//! s  = ReLU([bn] conv1×1(C_in → S))          squeeze, S = max(1, round(ratio · C))
//! e1 = ReLU([bn] conv1×1(S → ⌊C/2⌋))         expand 1×1
//! e3 = ReLU([bn] conv3×3(S → C − ⌊C/2⌋))     expand 3×3
//! out = concat(e1, e3)                        C channels, as before
//! ```
//!
//! so every reader of the layer sees the same channel count and spatial size. Weights go
//! from `9·C_in·C` to `S·(C_in + 5·C)` roughly; the default squeeze ratio 0.4 takes
//! the U-Net from log10 P = 7.492 to 7.042 (the paper's squeezed U-Net has 7.049).
//! Up-convolutions, 1×1 convolutions, strided or dilated convolutions, classifiers (a
//! convolution not followed by a ReLU) and layers a fire module would make larger
//! (FCN's widening fc6) are kept.

use anyhow::{bail, Result};
use ccnet_shared::graph::{Conv2d, NodeId, Op};

use crate::pack::fold::{readers, remap_inputs};

/// SqueezeNet's own squeeze ratio is 1/8; 0.4 is this toolchain's default, which puts a
/// squeezed U-Net close to the paper's parameter count.
pub const DEFAULT_SQUEEZE_RATIO: f64 = 0.4;

/// A hidden 3×3 layer found in a graph: the convolution, its optional batch norm and the
/// ReLU that ends it.
#[derive(Clone, Copy, Debug)]
struct Hidden {
    conv: Conv2d,
    bn_eps: Option<f32>,
    /// Nodes the layer spans (conv, [bn], relu).
    len: usize,
}

/// The hidden 3×3 layer starting at node `i`, if it is one whose intermediate nodes only
/// feed the next node.
fn hidden_at(graph: &[Op], reads: &[usize], i: usize) -> Option<Hidden> {
    let Op::Conv2d(c) = graph[i] else {
        return None;
    };
    if c.kernel != 3 || c.stride != 1 || c.dilation != 1 || c.padding != 1 || c.relu {
        return None;
    }
    let only = |n: usize, input: usize| {
        graph
            .get(n)
            .is_some_and(|op| op.inputs().as_slice() == [input as NodeId])
            && reads[input] == 1
    };
    match graph.get(i + 1) {
        Some(Op::BatchNorm { eps, .. }) if only(i + 1, i) => {
            if matches!(graph.get(i + 2), Some(Op::Relu { .. })) && only(i + 2, i + 1) {
                Some(Hidden {
                    conv: c,
                    bn_eps: Some(*eps),
                    len: 3,
                })
            } else {
                None
            }
        }
        Some(Op::Relu { .. }) if only(i + 1, i) => Some(Hidden {
            conv: c,
            bn_eps: None,
            len: 2,
        }),
        _ => None,
    }
}

fn squeeze_channels(c: u32, ratio: f64) -> u32 {
    ((ratio * f64::from(c)).round() as u32).max(1)
}

/// Whether a fire module has fewer weights than the 3×3 convolution it would replace
/// (it has more where a layer widens a lot, such as FCN's fc6).
fn fire_is_smaller(c: &Conv2d, ratio: f64) -> bool {
    let (i, o) = (u64::from(c.in_channels), u64::from(c.out_channels));
    let s = u64::from(squeeze_channels(c.out_channels, ratio));
    let e1 = o / 2;
    s * i + s * e1 + 9 * s * (o - e1) < 9 * i * o
}

/// Appends `conv [→ bn] → relu` and returns the ReLU's id.
fn push_layer(
    out: &mut Vec<Op>,
    input: NodeId,
    in_channels: u32,
    out_channels: u32,
    kernel: u16,
    bn_eps: Option<f32>,
) -> NodeId {
    out.push(Op::Conv2d(Conv2d {
        input,
        in_channels,
        out_channels,
        kernel,
        stride: 1,
        padding: kernel / 2,
        dilation: 1,
        bias: bn_eps.is_none(),
        relu: false,
    }));
    if let Some(eps) = bn_eps {
        let id = (out.len() - 1) as NodeId;
        out.push(Op::BatchNorm {
            input: id,
            channels: out_channels,
            eps,
        });
    }
    let id = (out.len() - 1) as NodeId;
    out.push(Op::Relu { input: id });
    (out.len() - 1) as NodeId
}

/// Replaces every hidden 3×3 layer of `graph` by a fire module with squeeze ratio
/// `ratio` (squeeze channels over output channels, in (0, 1]). Returns the new graph and
/// how many layers were replaced.
pub fn squeeze(graph: &[Op], ratio: f64) -> Result<(Vec<Op>, usize)> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        bail!("squeeze ratio must be in (0, 1], got {ratio}");
    }
    let reads = readers(graph);
    let mut out: Vec<Op> = Vec::with_capacity(graph.len() * 3);
    // New id of every old node (only the last node of a replaced layer is read from
    // outside it, and it maps to the fire module's concatenation).
    let mut map: Vec<NodeId> = vec![0; graph.len()];
    let mut replaced = 0;
    let mut i = 0;
    while i < graph.len() {
        match hidden_at(graph, &reads, i) {
            Some(h) if h.conv.out_channels >= 2 && fire_is_smaller(&h.conv, ratio) => {
                let c = h.conv.out_channels;
                let s = squeeze_channels(c, ratio);
                let e1 = c / 2;
                let input = map[h.conv.input as usize];
                let sq = push_layer(&mut out, input, h.conv.in_channels, s, 1, h.bn_eps);
                let a = push_layer(&mut out, sq, s, e1, 1, h.bn_eps);
                let b = push_layer(&mut out, sq, s, c - e1, 3, h.bn_eps);
                out.push(Op::Concat { a, b });
                let id = (out.len() - 1) as NodeId;
                for k in 0..h.len {
                    map[i + k] = id;
                }
                replaced += 1;
                i += h.len;
            }
            _ => {
                out.push(remap_inputs(graph[i], &map));
                map[i] = (out.len() - 1) as NodeId;
                i += 1;
            }
        }
    }
    if out.len() > usize::from(NodeId::MAX) {
        bail!("the squeezed graph has {} nodes, too many", out.len());
    }
    Ok((out, replaced))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{fuse_relu, FloatModel};
    use ccnet_models::{build, Arch, ArchConfig};
    use ccnet_shared::alpha::Alpha;
    use ccnet_shared::graph::{Graph, Shape};

    /// Output shapes of the deployed graph (ReLUs fused, so it fits a container).
    fn shapes(g: &[Op], h: u32) -> Vec<Shape> {
        let fused = fuse_relu(&FloatModel {
            graph: g.to_vec(),
            weights: Default::default(),
        })
        .graph;
        let mut s = vec![Shape::default(); fused.len()];
        Graph::new(&fused)
            .unwrap()
            .infer_shapes(h, h, &mut s)
            .unwrap();
        s
    }

    #[test]
    fn squeezed_networks_keep_valid_shapes_and_shrink() {
        for arch in Arch::ALL {
            for bn in [false, true] {
                let cfg = ArchConfig {
                    batch_norm: bn,
                    ..ArchConfig::new(arch, Alpha::parse("1/4").unwrap())
                };
                let g = build(&cfg).unwrap();
                let (sq, n) = squeeze(&g, DEFAULT_SQUEEZE_RATIO).unwrap();
                assert!(n > 0, "{arch}: nothing squeezed");
                // Valid structure (any length) and fewer parameters.
                Graph::new_with_scratch(&sq, &mut vec![0; sq.len()]).unwrap();
                let p0 = Graph::new_unchecked(&g).trainable_params();
                let p1 = Graph::new_unchecked(&sq).trainable_params();
                assert!(p1 < p0, "{arch} bn={bn}: {p1} >= {p0}");
                // The deployed network has every node's shape and the original output.
                if !bn {
                    let h = arch.input_multiple() * 4;
                    let (a, b) = (shapes(&g, h), shapes(&sq, h));
                    assert_eq!(a.last(), b.last(), "{arch}");
                }
            }
        }
    }

    #[test]
    fn unet_fire_modules_match_the_documented_size() {
        let g = build(&ArchConfig::new(Arch::Unet, Alpha::parse("1").unwrap())).unwrap();
        let (sq, n) = squeeze(&g, DEFAULT_SQUEEZE_RATIO).unwrap();
        // 18 hidden 3×3 layers; the first (1 → 64 channels) would grow as a fire module.
        assert_eq!(n, 17);
        let lp = (Graph::new_unchecked(&sq).trainable_params() as f64).log10();
        assert!((lp - 7.042).abs() < 0.001, "log10 P = {lp}");
        // The deployed squeezed U-Net fits a container.
        assert_eq!(shapes(&sq, 64).len(), 17 * 4 + 16);
    }

    #[test]
    fn a_graph_without_hidden_3x3_layers_is_unchanged() {
        let g = vec![
            Op::Input { channels: 1 },
            Op::Conv2d(Conv2d {
                input: 0,
                in_channels: 1,
                out_channels: 2,
                kernel: 1,
                stride: 1,
                padding: 0,
                dilation: 1,
                bias: true,
                relu: false,
            }),
            Op::Argmax { input: 1 },
        ];
        let (sq, n) = squeeze(&g, 0.5).unwrap();
        assert_eq!((sq, n), (g, 0));
        assert!(squeeze(&[Op::Input { channels: 1 }], 0.0).is_err());
    }
}
