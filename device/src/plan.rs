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
        // Blocks: a ReLU whose input dies at the ReLU shares its input's block, which then
        // lives until the ReLU's output dies.
        let mut in_place = [false; MAX_NODES];
        let mut root = [0usize; MAX_NODES];
        let mut end = [0usize; MAX_NODES];
        for i in 0..=t {
            if !needed[i] {
                continue;
            }
            root[i] = i;
            if let Op::Relu { input } = nodes[i] {
                let j = input as usize;
                if last[j] == i {
                    in_place[i] = true;
                    root[i] = root[j];
                }
            }
            end[root[i]] = end[root[i]].max(last[i]);
        }
        let mut order = [0usize; MAX_NODES];
        let mut count = 0;
        for i in 0..=t {
            if needed[i] && root[i] == i {
                order[count] = i;
                count += 1;
            }
        }
        // Two placements, keep the smaller: first fit in execution order, and first fit
        // by decreasing size (large long-lived buffers first).
        let mut by_order = [0usize; MAX_NODES];
        let total_a = place(&order[..count], &bytes, &end, &mut by_order)?;
        let mut sorted = order;
        sorted[..count].sort_unstable_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
        let mut by_size = [0usize; MAX_NODES];
        let total_b = place(&sorted[..count], &bytes, &end, &mut by_size)?;
        let (mut offsets, total) = if total_b < total_a {
            (by_size, total_b)
        } else {
            (by_order, total_a)
        };
        for i in 0..=t {
            if needed[i] {
                offsets[i] = offsets[root[i]];
            }
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

/// Places blocks (node `b` alive over `[b, end[b]]`, `bytes[b]` long) in the given order,
/// each at the lowest aligned offset free of every already placed block whose lifetime
/// overlaps; returns the arena length.
fn place(
    order: &[usize],
    bytes: &[usize; MAX_NODES],
    end: &[usize; MAX_NODES],
    offsets: &mut [usize; MAX_NODES],
) -> Result<usize, DeviceError> {
    let mut total = 0usize;
    for (k, &b) in order.iter().enumerate() {
        let placed = &order[..k];
        let overlaps = |p: usize| p <= end[b] && b <= end[p];
        let fits = |o: usize| {
            placed
                .iter()
                .filter(|&&p| overlaps(p))
                .all(|&p| o.saturating_add(bytes[b]) <= offsets[p] || o >= offsets[p] + bytes[p])
        };
        let mut best: Option<usize> = None;
        let candidates = core::iter::once(0).chain(
            placed
                .iter()
                .filter(|&&p| overlaps(p))
                .map(|&p| (offsets[p] + bytes[p]).next_multiple_of(ARENA_ALIGN)),
        );
        for cand in candidates {
            if best.is_none_or(|x| cand < x) && fits(cand) {
                best = Some(cand);
            }
        }
        let o = best.ok_or(DeviceError::Internal)?;
        offsets[b] = o;
        total = total.max(o.checked_add(bytes[b]).ok_or(DeviceError::TooLarge)?);
    }
    Ok(total)
}
