//! The arena plan: where every node's output lives in the caller's scratch memory.
//!
//! Nodes run in graph order. A node's output is placed, first fit, at the lowest
//! 16-byte-aligned offset that overlaps no output still needed by a later node; it is
//! released after its last reader ran. U-Net skip connections therefore stay alive across
//! the decoder and everything else reuses memory. A ReLU whose input dies at the ReLU
//! runs in place. Only the nodes the requested output depends on are planned and run.

use ccnet_shared::graph::{Graph, NodeId, Op, Shape, MAX_NODES};
use ccnet_shared::plan::peak_activation_bytes;

use crate::DeviceError;

/// Alignment of every buffer in the arena (and of the arena itself).
pub const ARENA_ALIGN: usize = 16;

/// A planned forward pass for one input size.
#[derive(Clone, Debug)]
pub struct ArenaPlan {
    pub(crate) len: usize,
    pub(crate) shapes: [Shape; MAX_NODES],
    pub(crate) offsets: [usize; MAX_NODES],
    pub(crate) bytes: [usize; MAX_NODES],
    pub(crate) needed: [bool; MAX_NODES],
    pub(crate) in_place: [bool; MAX_NODES],
    pub(crate) elem_bytes: usize,
    total: usize,
    lower_bound: u64,
    target: NodeId,
}

impl ArenaPlan {
    /// Plans the nodes up to and including `target` for an `h × w` input with
    /// `elem_bytes` bytes per activation element (4 for f32 models, 1 for int8).
    pub fn new(
        graph: &Graph<'_>,
        h: u32,
        w: u32,
        elem_bytes: usize,
        target: NodeId,
    ) -> Result<ArenaPlan, DeviceError> {
        let n = graph.len();
        let t = target as usize;
        if t >= n {
            return Err(DeviceError::BadNode { node: target });
        }
        let mut shapes = [Shape::default(); MAX_NODES];
        graph
            .infer_shapes(h, w, &mut shapes)
            .map_err(DeviceError::Graph)?;
        let nodes = graph.nodes();
        // Which nodes the target depends on (nodes only read earlier nodes).
        let mut needed = [false; MAX_NODES];
        needed[t] = true;
        for i in (0..=t).rev() {
            if needed[i] {
                for &j in nodes[i].inputs().as_slice() {
                    needed[j as usize] = true;
                }
            }
        }
        // Last reader of every needed node (the target is read at the end).
        let mut last = [0usize; MAX_NODES];
        for (i, slot) in last.iter_mut().enumerate().take(t + 1) {
            *slot = i;
        }
        for i in 0..=t {
            if needed[i] {
                for &j in nodes[i].inputs().as_slice() {
                    last[j as usize] = last[j as usize].max(i);
                }
            }
        }
        let mut bytes = [0usize; MAX_NODES];
        for i in 0..=t {
            let el = usize::try_from(shapes[i].elements()).map_err(|_| DeviceError::TooLarge)?;
            bytes[i] = el
                .checked_mul(elem_bytes)
                .and_then(|b| b.checked_next_multiple_of(ARENA_ALIGN))
                .ok_or(DeviceError::TooLarge)?;
        }
        let mut offsets = [0usize; MAX_NODES];
        let mut in_place = [false; MAX_NODES];
        let mut total = 0usize;
        for i in 0..=t {
            if !needed[i] {
                continue;
            }
            if let Op::Relu { input } = nodes[i] {
                let j = input as usize;
                if last[j] == i {
                    offsets[i] = offsets[j];
                    in_place[i] = true;
                    continue;
                }
            }
            let live = |j: usize| j < i && needed[j] && last[j] >= i;
            let fits = |o: usize| {
                (0..i).filter(|&j| live(j)).all(|j| {
                    let (a, b) = (offsets[j], offsets[j] + bytes[j]);
                    o + bytes[i] <= a || o >= b
                })
            };
            let mut best = None;
            for cand in core::iter::once(0).chain(
                (0..i)
                    .filter(|&j| live(j))
                    .map(|j| (offsets[j] + bytes[j]).next_multiple_of(ARENA_ALIGN)),
            ) {
                if best.is_none_or(|b| cand < b) && fits(cand) {
                    best = Some(cand);
                }
            }
            let o = best.ok_or(DeviceError::Internal)?;
            offsets[i] = o;
            total = total.max(o.checked_add(bytes[i]).ok_or(DeviceError::TooLarge)?);
        }
        let lower_bound = if t + 1 == n {
            peak_activation_bytes(graph, &shapes, elem_bytes as u64)
                .map_err(DeviceError::Graph)?
                .bytes
        } else {
            0
        };
        Ok(ArenaPlan {
            len: t + 1,
            shapes,
            offsets,
            bytes,
            needed,
            in_place,
            elem_bytes,
            total,
            lower_bound,
            target,
        })
    }

    /// Bytes of the planned arena (16-byte aligned start).
    pub fn planned_bytes(&self) -> usize {
        self.total
    }

    /// The lower bound of `ccnet_shared::plan::peak_activation_bytes` (simultaneously live
    /// outputs without in-place execution or alignment) for a whole-graph plan, else 0.
    pub fn lower_bound_bytes(&self) -> u64 {
        self.lower_bound
    }

    /// The output shape of node `id`.
    pub fn shape(&self, id: NodeId) -> Option<Shape> {
        (usize::from(id) < self.len).then(|| self.shapes[usize::from(id)])
    }

    /// Byte range of node `id`'s output in the (aligned) arena, if it is planned.
    pub fn range(&self, id: NodeId) -> Option<core::ops::Range<usize>> {
        let i = usize::from(id);
        (i < self.len && self.needed[i]).then(|| self.offsets[i]..self.offsets[i] + self.bytes[i])
    }

    /// The node whose output this plan produces.
    pub fn target(&self) -> NodeId {
        self.target
    }

    /// Bytes per activation element (4 or 1).
    pub fn elem_bytes(&self) -> usize {
        self.elem_bytes
    }
}
