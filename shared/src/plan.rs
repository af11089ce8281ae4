//! Activation liveness: which node outputs must be alive at once, and the resulting
//! lower bound on the activation memory of a forward pass.
//!
//! Node `i` runs with all earlier outputs that a node `≥ i` still reads, plus its own
//! output. The peak of those sums is the least memory any schedule of this node order
//! needs without computing in place (U-Net skips stay alive across the decoder).

use crate::graph::{Graph, GraphError, NodeId, Shape, MAX_NODES};

/// The largest set of simultaneously live activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeakMemory {
    /// Bytes alive at the peak.
    pub bytes: u64,
    /// The node that runs at the peak.
    pub at_node: NodeId,
}

/// For every node, the index of the last node that reads its output (itself if none;
/// the output node counts as read at the end).
pub fn last_uses(graph: &Graph<'_>, out: &mut [NodeId]) -> Result<(), GraphError> {
    let n = graph.len();
    if out.len() < n {
        return Err(GraphError::ScratchTooSmall { needed: n });
    }
    for (i, slot) in out.iter_mut().enumerate().take(n) {
        *slot = i as NodeId;
    }
    for (i, op) in graph.nodes().iter().enumerate() {
        for &inp in op.inputs().as_slice() {
            if (inp as usize) < n {
                out[inp as usize] = out[inp as usize].max(i as NodeId);
            }
        }
    }
    Ok(())
}

/// Peak live activation bytes for the given shapes (from [`Graph::infer_shapes`]) at
/// `elem_bytes` bytes per element (4 for f32, 1 for int8).
pub fn peak_activation_bytes(
    graph: &Graph<'_>,
    shapes: &[Shape],
    elem_bytes: u64,
) -> Result<PeakMemory, GraphError> {
    let n = graph.len();
    if shapes.len() < n {
        return Err(GraphError::ScratchTooSmall { needed: n });
    }
    let mut last = [0 as NodeId; MAX_NODES];
    last_uses(graph, &mut last)?;
    let mut best = PeakMemory {
        bytes: 0,
        at_node: 0,
    };
    for i in 0..n {
        let live: u64 = (0..=i)
            .filter(|&j| j == i || last[j] as usize >= i)
            .map(|j| shapes[j].elements() * elem_bytes)
            .sum();
        if live > best.bytes {
            best = PeakMemory {
                bytes: live,
                at_node: i as NodeId,
            };
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Op;

    #[test]
    fn skip_connections_stay_alive() {
        // input -> pool -> upsample -> concat(input, up)
        let nodes = [
            Op::Input { channels: 2 },
            Op::MaxPool {
                input: 0,
                kernel: 2,
                stride: 2,
            },
            Op::Upsample {
                input: 1,
                factor: 2,
            },
            Op::Concat { a: 0, b: 2 },
        ];
        let g = Graph::new(&nodes).unwrap();
        let mut shapes = [Shape::default(); 4];
        g.infer_shapes(4, 4, &mut shapes).unwrap();
        let mut last = [0; 4];
        last_uses(&g, &mut last).unwrap();
        assert_eq!(last, [3, 2, 3, 3]);
        // at node 3: input (32) + upsample (32) + concat (64) elements
        let peak = peak_activation_bytes(&g, &shapes, 4).unwrap();
        assert_eq!(
            peak,
            PeakMemory {
                bytes: (32 + 32 + 64) * 4,
                at_node: 3
            }
        );
    }
}
