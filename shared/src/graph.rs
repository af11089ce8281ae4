//! The graph IR: a segmentation CNN as a list of nodes in topological order.
//!
//! Node 0 is the only [`Op::Input`]; every other node names its inputs by index, and an
//! input index is always smaller than the node's own index. The last node is the output.
//! Tensors are `C × H × W` (batch 1 at inference; the trainer adds a batch axis).
//!
//! Everything here is allocation-free: shape inference writes into a caller-provided
//! slice, counts are returned as `u64`.

use core::fmt;
use serde::{Deserialize, Serialize};

/// Index of a node in its graph.
pub type NodeId = u16;

/// Most nodes a graph may have (the container stores the graph in a fixed-capacity list).
pub const MAX_NODES: usize = 128;

/// Square 2-D convolution geometry (`kernel × kernel`, same stride/padding/dilation on
/// both axes), optionally with bias and a fused ReLU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conv2d {
    /// Input node.
    pub input: NodeId,
    /// Input channels (must equal the input node's channels).
    pub in_channels: u32,
    /// Output channels.
    pub out_channels: u32,
    /// Kernel side.
    pub kernel: u16,
    /// Stride.
    pub stride: u16,
    /// Zero padding on every side.
    pub padding: u16,
    /// Dilation.
    pub dilation: u16,
    /// Whether a bias vector follows the weights.
    pub bias: bool,
    /// Whether a ReLU is fused after the convolution (set by packing).
    pub relu: bool,
}

/// Square 2-D transposed convolution ("up-convolution").
/// Output side = `(in − 1)·stride − 2·padding + kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvTranspose2d {
    /// Input node.
    pub input: NodeId,
    /// Input channels.
    pub in_channels: u32,
    /// Output channels.
    pub out_channels: u32,
    /// Kernel side.
    pub kernel: u16,
    /// Stride.
    pub stride: u16,
    /// Padding removed from every side of the full output.
    pub padding: u16,
    /// Whether a bias vector follows the weights.
    pub bias: bool,
    /// Whether a ReLU is fused after the operation (set by packing).
    pub relu: bool,
}

/// One operation of the graph with its geometry and its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// The network input with this many channels (1 gray, 3 RGB). Only node 0.
    Input {
        /// Input channels.
        channels: u32,
    },
    /// 2-D convolution (weights `[out, in, k, k]`, bias `[out]`).
    Conv2d(Conv2d),
    /// 2-D transposed convolution (weights `[in, out, k, k]`, bias `[out]`).
    ConvTranspose2d(ConvTranspose2d),
    /// Batch normalisation over channels: a training-time node that packing folds into
    /// the preceding convolution. Parameters `gamma, beta, running_mean, running_var`.
    BatchNorm {
        /// Input node.
        input: NodeId,
        /// Channels normalised.
        channels: u32,
        /// Variance epsilon.
        eps: f32,
    },
    /// Element-wise `max(x, 0)`.
    Relu {
        /// Input node.
        input: NodeId,
    },
    /// Max-pooling without padding; output side = `(in − kernel) / stride + 1`.
    MaxPool {
        /// Input node.
        input: NodeId,
        /// Window side.
        kernel: u16,
        /// Stride.
        stride: u16,
    },
    /// Nearest-neighbour upsampling by an integer factor.
    Upsample {
        /// Input node.
        input: NodeId,
        /// Scale factor on both axes.
        factor: u16,
    },
    /// Channel concatenation `[a, b]` of two maps with the same height and width
    /// (a U-Net skip connection).
    Concat {
        /// First input (its channels come first).
        a: NodeId,
        /// Second input.
        b: NodeId,
    },
    /// Element-wise sum of two maps of identical shape (FCN / CUMedVision score fusion).
    Add {
        /// First input.
        a: NodeId,
        /// Second input.
        b: NodeId,
    },
    /// Softmax over channels (class probabilities).
    Softmax {
        /// Input node.
        input: NodeId,
    },
    /// Arg-max over channels: one channel holding the class index.
    Argmax {
        /// Input node.
        input: NodeId,
    },
}

/// A node's inputs: zero, one or two node indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inputs {
    ids: [NodeId; 2],
    len: u8,
}

impl Inputs {
    /// The inputs as a slice.
    pub fn as_slice(&self) -> &[NodeId] {
        &self.ids[..self.len as usize]
    }
}

impl Op {
    /// The nodes this operation reads.
    pub fn inputs(&self) -> Inputs {
        let one = |i| Inputs {
            ids: [i, 0],
            len: 1,
        };
        match *self {
            Op::Input { .. } => Inputs {
                ids: [0, 0],
                len: 0,
            },
            Op::Conv2d(c) => one(c.input),
            Op::ConvTranspose2d(c) => one(c.input),
            Op::BatchNorm { input, .. }
            | Op::Relu { input }
            | Op::MaxPool { input, .. }
            | Op::Upsample { input, .. }
            | Op::Softmax { input }
            | Op::Argmax { input } => one(input),
            Op::Concat { a, b } | Op::Add { a, b } => Inputs {
                ids: [a, b],
                len: 2,
            },
        }
    }

    /// Short lower-case name of the operation kind (`conv`, `convt`, `bn`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Conv2d(_) => "conv",
            Op::ConvTranspose2d(_) => "convt",
            Op::BatchNorm { .. } => "bn",
            Op::Relu { .. } => "relu",
            Op::MaxPool { .. } => "maxpool",
            Op::Upsample { .. } => "upsample",
            Op::Concat { .. } => "concat",
            Op::Add { .. } => "add",
            Op::Softmax { .. } => "softmax",
            Op::Argmax { .. } => "argmax",
        }
    }

    /// Number of trainable parameters of this node (weights + bias; `gamma + beta` for
    /// batch norm, whose running statistics are not trainable).
    pub fn trainable_params(&self) -> u64 {
        match *self {
            Op::Conv2d(c) => {
                let k = u64::from(c.kernel);
                u64::from(c.in_channels) * u64::from(c.out_channels) * k * k
                    + if c.bias { u64::from(c.out_channels) } else { 0 }
            }
            Op::ConvTranspose2d(c) => {
                let k = u64::from(c.kernel);
                u64::from(c.in_channels) * u64::from(c.out_channels) * k * k
                    + if c.bias { u64::from(c.out_channels) } else { 0 }
            }
            Op::BatchNorm { channels, .. } => 2 * u64::from(channels),
            _ => 0,
        }
    }

    /// Parameter tensors this node owns, in storage order, with their shapes
    /// (unused trailing dimensions are 1). Empty for parameter-free nodes.
    pub fn param_tensors(&self) -> ParamTensors {
        let mut out = ParamTensors {
            items: [(ParamRole::Weight, [0; 4]); 4],
            len: 0,
        };
        let mut push = |role, dims| {
            out.items[out.len] = (role, dims);
            out.len += 1;
        };
        match *self {
            Op::Conv2d(c) => {
                let k = u32::from(c.kernel);
                push(ParamRole::Weight, [c.out_channels, c.in_channels, k, k]);
                if c.bias {
                    push(ParamRole::Bias, [c.out_channels, 1, 1, 1]);
                }
            }
            Op::ConvTranspose2d(c) => {
                let k = u32::from(c.kernel);
                push(ParamRole::Weight, [c.in_channels, c.out_channels, k, k]);
                if c.bias {
                    push(ParamRole::Bias, [c.out_channels, 1, 1, 1]);
                }
            }
            Op::BatchNorm { channels, .. } => {
                for role in [
                    ParamRole::Gamma,
                    ParamRole::Beta,
                    ParamRole::RunningMean,
                    ParamRole::RunningVar,
                ] {
                    push(role, [channels, 1, 1, 1]);
                }
            }
            _ => {}
        }
        out
    }
}

/// What a parameter tensor is to its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamRole {
    /// Convolution weights.
    Weight,
    /// Convolution bias.
    Bias,
    /// Batch-norm scale.
    Gamma,
    /// Batch-norm shift.
    Beta,
    /// Batch-norm running mean (not trainable).
    RunningMean,
    /// Batch-norm running variance (not trainable).
    RunningVar,
    /// Per-output-channel quantization scales of an int8 weight tensor (f32).
    WeightScale,
}

impl ParamRole {
    /// Name used in weight files (`weight`, `bias`, `gamma`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ParamRole::Weight => "weight",
            ParamRole::Bias => "bias",
            ParamRole::Gamma => "gamma",
            ParamRole::Beta => "beta",
            ParamRole::RunningMean => "running_mean",
            ParamRole::RunningVar => "running_var",
            ParamRole::WeightScale => "weight_scale",
        }
    }

    /// Whether training updates this tensor.
    pub fn is_trainable(self) -> bool {
        matches!(
            self,
            ParamRole::Weight | ParamRole::Bias | ParamRole::Gamma | ParamRole::Beta
        )
    }
}

/// The parameter tensors of one node: `(role, [d0, d1, d2, d3])`.
#[derive(Clone, Copy, Debug)]
pub struct ParamTensors {
    items: [(ParamRole, [u32; 4]); 4],
    len: usize,
}

impl ParamTensors {
    /// The tensors as a slice.
    pub fn as_slice(&self) -> &[(ParamRole, [u32; 4])] {
        &self.items[..self.len]
    }
}

/// A `C × H × W` activation shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Channels.
    pub c: u32,
    /// Height.
    pub h: u32,
    /// Width.
    pub w: u32,
}

impl Shape {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        u64::from(self.c) * u64::from(self.h) * u64::from(self.w)
    }
}

/// Why a graph is invalid or cannot run on a given input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GraphError {
    /// The graph has no nodes.
    Empty,
    /// More than [`MAX_NODES`] nodes.
    TooManyNodes {
        /// Nodes in the graph.
        count: usize,
    },
    /// Node 0 is not an input, or an input appears elsewhere.
    MisplacedInput {
        /// Offending node.
        node: NodeId,
    },
    /// A node reads a node that is not before it.
    BadEdge {
        /// Offending node.
        node: NodeId,
        /// The input it names.
        input: NodeId,
    },
    /// Declared input channels differ from what the input node produces.
    ChannelMismatch {
        /// Offending node.
        node: NodeId,
        /// Channels declared.
        expected: u32,
        /// Channels produced by the input.
        found: u32,
    },
    /// A zero channel count, kernel, stride, dilation or factor.
    ZeroGeometry {
        /// Offending node.
        node: NodeId,
    },
    /// The spatial size does not work for this node (window larger than the map,
    /// two merged maps of different size, or a zero-sized result).
    SpatialMismatch {
        /// Offending node.
        node: NodeId,
    },
    /// A size overflowed 32 bits.
    Overflow {
        /// Offending node.
        node: NodeId,
    },
    /// The caller's scratch slice is shorter than the graph.
    ScratchTooSmall {
        /// Slots needed.
        needed: usize,
    },
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GraphError::Empty => write!(f, "the graph has no nodes"),
            GraphError::TooManyNodes { count } => {
                write!(f, "the graph has {count} nodes, at most {MAX_NODES} are supported")
            }
            GraphError::MisplacedInput { node } => {
                write!(f, "node {node}: the input must be node 0 and only node 0")
            }
            GraphError::BadEdge { node, input } => {
                write!(f, "node {node} reads node {input}, which does not come before it")
            }
            GraphError::ChannelMismatch {
                node,
                expected,
                found,
            } => write!(
                f,
                "node {node} expects {expected} input channels but receives {found}"
            ),
            GraphError::ZeroGeometry { node } => {
                write!(f, "node {node} has a zero channel count, kernel, stride or factor")
            }
            GraphError::SpatialMismatch { node } => write!(
                f,
                "node {node}: the input size does not fit this operation (window larger than the map or merged maps of different size)"
            ),
            GraphError::Overflow { node } => write!(f, "node {node}: a size overflows 32 bits"),
            GraphError::ScratchTooSmall { needed } => {
                write!(f, "the scratch slice needs {needed} entries")
            }
        }
    }
}

/// A borrowed graph: nodes in topological order, node 0 the input, last node the output.
#[derive(Clone, Copy, Debug)]
pub struct Graph<'a> {
    nodes: &'a [Op],
}

/// Totals of a graph for one input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Trainable parameters.
    pub params: u64,
    /// Multiply-accumulates of one forward pass.
    pub macs: u64,
    /// Elements of all activations (every node's output, input included).
    pub activation_elements: u64,
    /// Elements of the largest single activation.
    pub largest_activation_elements: u64,
}

impl<'a> Graph<'a> {
    /// Wraps nodes without checking them; use [`Graph::new`] to validate.
    pub const fn new_unchecked(nodes: &'a [Op]) -> Self {
        Graph { nodes }
    }

    /// Wraps and validates the structure (edges, input placement, channel consistency).
    pub fn new(nodes: &'a [Op]) -> Result<Self, GraphError> {
        let g = Graph { nodes };
        let mut channels = [0u32; MAX_NODES];
        g.check_structure(&mut channels)?;
        Ok(g)
    }

    /// Validates like [`Graph::new`] a graph of any length, with caller scratch of at
    /// least one entry per node. Training graphs on the host (batch norm after every
    /// convolution of a squeezed network, say) may exceed [`MAX_NODES`], which limits
    /// what a container holds and the device runs.
    pub fn new_with_scratch(nodes: &'a [Op], channels: &mut [u32]) -> Result<Self, GraphError> {
        let g = Graph { nodes };
        g.check_edges_and_channels(channels)?;
        Ok(g)
    }

    /// The nodes.
    pub fn nodes(&self) -> &'a [Op] {
        self.nodes
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Input channels (node 0).
    pub fn input_channels(&self) -> u32 {
        match self.nodes.first() {
            Some(Op::Input { channels }) => *channels,
            _ => 0,
        }
    }

    /// Checks edges and channel consistency; writes each node's channel count.
    fn check_structure(&self, channels: &mut [u32]) -> Result<(), GraphError> {
        if self.nodes.len() > MAX_NODES {
            return Err(GraphError::TooManyNodes {
                count: self.nodes.len(),
            });
        }
        self.check_edges_and_channels(channels)
    }

    /// [`Graph::check_structure`] without the node limit.
    fn check_edges_and_channels(&self, channels: &mut [u32]) -> Result<(), GraphError> {
        if self.nodes.is_empty() {
            return Err(GraphError::Empty);
        }
        if channels.len() < self.nodes.len() {
            return Err(GraphError::ScratchTooSmall {
                needed: self.nodes.len(),
            });
        }
        for (i, op) in self.nodes.iter().enumerate() {
            let id = i as NodeId;
            let is_input = matches!(op, Op::Input { .. });
            if is_input != (i == 0) {
                return Err(GraphError::MisplacedInput { node: id });
            }
            for &inp in op.inputs().as_slice() {
                if inp >= id {
                    return Err(GraphError::BadEdge {
                        node: id,
                        input: inp,
                    });
                }
            }
            let first = |k: usize| channels[op.inputs().as_slice()[k] as usize];
            let check = |expected: u32, found: u32| {
                if expected == found {
                    Ok(())
                } else {
                    Err(GraphError::ChannelMismatch {
                        node: id,
                        expected,
                        found,
                    })
                }
            };
            let zero = Err(GraphError::ZeroGeometry { node: id });
            channels[i] = match *op {
                Op::Input { channels } => {
                    if channels == 0 {
                        return zero;
                    }
                    channels
                }
                Op::Conv2d(c) => {
                    if c.out_channels == 0
                        || c.kernel == 0
                        || c.stride == 0
                        || c.dilation == 0
                        || c.in_channels == 0
                    {
                        return zero;
                    }
                    check(c.in_channels, first(0))?;
                    c.out_channels
                }
                Op::ConvTranspose2d(c) => {
                    if c.out_channels == 0 || c.kernel == 0 || c.stride == 0 || c.in_channels == 0 {
                        return zero;
                    }
                    check(c.in_channels, first(0))?;
                    c.out_channels
                }
                Op::BatchNorm { channels: c, .. } => {
                    check(c, first(0))?;
                    c
                }
                Op::MaxPool { kernel, stride, .. } => {
                    if kernel == 0 || stride == 0 {
                        return zero;
                    }
                    first(0)
                }
                Op::Upsample { factor, .. } => {
                    if factor == 0 {
                        return zero;
                    }
                    first(0)
                }
                Op::Relu { .. } | Op::Softmax { .. } => first(0),
                Op::Argmax { .. } => 1,
                Op::Concat { .. } => first(0)
                    .checked_add(first(1))
                    .ok_or(GraphError::Overflow { node: id })?,
                Op::Add { .. } => {
                    check(first(0), first(1))?;
                    first(0)
                }
            };
        }
        Ok(())
    }

    /// Infers every node's output shape for an `h × w` input into `shapes`
    /// (at least [`Graph::len`] entries), validating the structure on the way.
    pub fn infer_shapes(&self, h: u32, w: u32, shapes: &mut [Shape]) -> Result<(), GraphError> {
        let mut channels = [0u32; MAX_NODES];
        self.check_structure(&mut channels)?;
        if shapes.len() < self.nodes.len() {
            return Err(GraphError::ScratchTooSmall {
                needed: self.nodes.len(),
            });
        }
        for (i, op) in self.nodes.iter().enumerate() {
            let id = i as NodeId;
            let bad = GraphError::SpatialMismatch { node: id };
            let ovf = GraphError::Overflow { node: id };
            let src = |k: usize| shapes[op.inputs().as_slice()[k] as usize];
            let (oh, ow) = match *op {
                Op::Input { .. } => (h, w),
                Op::Conv2d(c) => {
                    let s = src(0);
                    let span = |x: u32| -> Result<u32, GraphError> {
                        let eff = (u32::from(c.kernel) - 1) * u32::from(c.dilation) + 1;
                        let padded = x.checked_add(2 * u32::from(c.padding)).ok_or(ovf)?;
                        if padded < eff {
                            return Err(bad);
                        }
                        Ok((padded - eff) / u32::from(c.stride) + 1)
                    };
                    (span(s.h)?, span(s.w)?)
                }
                Op::ConvTranspose2d(c) => {
                    let s = src(0);
                    let span = |x: u32| -> Result<u32, GraphError> {
                        let full = (x - 1)
                            .checked_mul(u32::from(c.stride))
                            .and_then(|v| v.checked_add(u32::from(c.kernel)))
                            .ok_or(ovf)?;
                        full.checked_sub(2 * u32::from(c.padding))
                            .filter(|&v| v > 0)
                            .ok_or(bad)
                    };
                    (span(s.h)?, span(s.w)?)
                }
                Op::MaxPool { kernel, stride, .. } => {
                    let s = src(0);
                    let span = |x: u32| -> Result<u32, GraphError> {
                        if x < u32::from(kernel) {
                            return Err(bad);
                        }
                        Ok((x - u32::from(kernel)) / u32::from(stride) + 1)
                    };
                    (span(s.h)?, span(s.w)?)
                }
                Op::Upsample { factor, .. } => {
                    let s = src(0);
                    let f = u32::from(factor);
                    (
                        s.h.checked_mul(f).ok_or(ovf)?,
                        s.w.checked_mul(f).ok_or(ovf)?,
                    )
                }
                Op::Concat { .. } | Op::Add { .. } => {
                    let (a, b) = (src(0), src(1));
                    if a.h != b.h || a.w != b.w {
                        return Err(bad);
                    }
                    (a.h, a.w)
                }
                Op::BatchNorm { .. } | Op::Relu { .. } | Op::Softmax { .. } | Op::Argmax { .. } => {
                    let s = src(0);
                    (s.h, s.w)
                }
            };
            if oh == 0 || ow == 0 {
                return Err(bad);
            }
            let shape = Shape {
                c: channels[i],
                h: oh,
                w: ow,
            };
            if shape.elements() > u64::from(u32::MAX) {
                return Err(ovf);
            }
            shapes[i] = shape;
        }
        Ok(())
    }

    /// Trainable parameters of the whole graph.
    pub fn trainable_params(&self) -> u64 {
        self.nodes.iter().map(Op::trainable_params).sum()
    }

    /// Parameters, MACs and activation sizes for an `h × w` input.
    pub fn stats(&self, h: u32, w: u32) -> Result<Stats, GraphError> {
        let mut shapes = [Shape::default(); MAX_NODES];
        self.infer_shapes(h, w, &mut shapes)?;
        let mut st = Stats {
            params: self.trainable_params(),
            ..Stats::default()
        };
        for (i, op) in self.nodes.iter().enumerate() {
            let out = shapes[i];
            st.activation_elements += out.elements();
            st.largest_activation_elements = st.largest_activation_elements.max(out.elements());
            st.macs += match *op {
                Op::Conv2d(c) => {
                    let k = u64::from(c.kernel);
                    out.elements() * u64::from(c.in_channels) * k * k
                }
                Op::ConvTranspose2d(c) => {
                    let k = u64::from(c.kernel);
                    shapes[c.input as usize].elements() * u64::from(c.out_channels) * k * k
                }
                _ => 0,
            };
        }
        Ok(st)
    }
}

/// A stable, human-readable name for a parameterised node: its kind and ordinal among
/// nodes of that kind (`conv07`, `convt2`, `bn12`). The same for every width multiplier,
/// so weight files of one architecture line up across α.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamName {
    /// `conv`, `convt` or `bn`.
    pub kind: &'static str,
    /// Ordinal among nodes of that kind, from 0.
    pub ordinal: u16,
}

impl fmt::Display for ParamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:02}", self.kind, self.ordinal)
    }
}

impl Graph<'_> {
    /// The stable name of node `id` if it owns parameters.
    pub fn param_name(&self, id: NodeId) -> Option<ParamName> {
        let op = self.nodes.get(id as usize)?;
        if op.param_tensors().as_slice().is_empty() {
            return None;
        }
        let kind = op.kind();
        let ordinal = self.nodes[..id as usize]
            .iter()
            .filter(|o| o.kind() == kind)
            .count() as u16;
        Some(ParamName { kind, ordinal })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(input: NodeId, i: u32, o: u32, k: u16, p: u16) -> Op {
        Op::Conv2d(Conv2d {
            input,
            in_channels: i,
            out_channels: o,
            kernel: k,
            stride: 1,
            padding: p,
            dilation: 1,
            bias: true,
            relu: false,
        })
    }

    #[test]
    fn shapes_params_and_macs_of_a_small_graph() {
        let nodes = [
            Op::Input { channels: 1 },
            conv(0, 1, 4, 3, 1),
            Op::Relu { input: 1 },
            Op::MaxPool {
                input: 2,
                kernel: 2,
                stride: 2,
            },
            conv(3, 4, 8, 3, 1),
            Op::ConvTranspose2d(ConvTranspose2d {
                input: 4,
                in_channels: 8,
                out_channels: 4,
                kernel: 2,
                stride: 2,
                padding: 0,
                bias: true,
                relu: false,
            }),
            Op::Concat { a: 2, b: 5 },
            conv(6, 8, 2, 1, 0),
            Op::Argmax { input: 7 },
        ];
        let g = Graph::new(&nodes).unwrap();
        let mut shapes = [Shape::default(); 9];
        g.infer_shapes(8, 6, &mut shapes).unwrap();
        assert_eq!(shapes[3], Shape { c: 4, h: 4, w: 3 });
        assert_eq!(shapes[5], Shape { c: 4, h: 8, w: 6 });
        assert_eq!(shapes[6], Shape { c: 8, h: 8, w: 6 });
        assert_eq!(shapes[8], Shape { c: 1, h: 8, w: 6 });
        let p = (4 * 9 + 4) + (4 * 8 * 9 + 8) + (8 * 4 * 4 + 4) + (8 * 2 + 2);
        assert_eq!(g.trainable_params(), p);
        let st = g.stats(8, 6).unwrap();
        let macs = 48 * 4 * 9 + 12 * 8 * 4 * 9 + 12 * 8 * 4 * 4 + 48 * 2 * 8;
        assert_eq!(st.macs, macs);
        assert_eq!(
            g.param_name(4).map(|n| n.to_string_fixed()),
            Some(*b"conv01")
        );
    }

    impl ParamName {
        fn to_string_fixed(self) -> [u8; 6] {
            use core::fmt::Write;
            struct Buf([u8; 6], usize);
            impl Write for Buf {
                fn write_str(&mut self, s: &str) -> fmt::Result {
                    for b in s.bytes() {
                        self.0[self.1] = b;
                        self.1 += 1;
                    }
                    Ok(())
                }
            }
            let mut b = Buf([0; 6], 0);
            write!(b, "{self}").unwrap();
            b.0
        }
    }

    #[test]
    fn structural_errors_are_specific() {
        let bad_edge = [Op::Input { channels: 1 }, Op::Relu { input: 1 }];
        assert_eq!(
            Graph::new(&bad_edge).unwrap_err(),
            GraphError::BadEdge { node: 1, input: 1 }
        );
        let mismatch = [Op::Input { channels: 3 }, conv(0, 1, 4, 3, 1)];
        assert!(matches!(
            Graph::new(&mismatch).unwrap_err(),
            GraphError::ChannelMismatch { node: 1, .. }
        ));
        let two_inputs = [Op::Input { channels: 1 }, Op::Input { channels: 1 }];
        assert_eq!(
            Graph::new(&two_inputs).unwrap_err(),
            GraphError::MisplacedInput { node: 1 }
        );
        let zero = [Op::Input { channels: 1 }, conv(0, 1, 0, 3, 1)];
        assert_eq!(
            Graph::new(&zero).unwrap_err(),
            GraphError::ZeroGeometry { node: 1 }
        );
        assert_eq!(Graph::new(&[]).unwrap_err(), GraphError::Empty);
    }

    #[test]
    fn spatial_errors_are_found_at_shape_inference() {
        let nodes = [
            Op::Input { channels: 1 },
            Op::MaxPool {
                input: 0,
                kernel: 2,
                stride: 2,
            },
            Op::Upsample {
                input: 1,
                factor: 2,
            },
            Op::Add { a: 0, b: 2 },
        ];
        let g = Graph::new(&nodes).unwrap();
        let mut shapes = [Shape::default(); 4];
        assert!(g.infer_shapes(8, 8, &mut shapes).is_ok());
        assert_eq!(
            g.infer_shapes(7, 8, &mut shapes).unwrap_err(),
            GraphError::SpatialMismatch { node: 3 }
        );
        assert_eq!(
            g.infer_shapes(1, 8, &mut shapes).unwrap_err(),
            GraphError::SpatialMismatch { node: 1 }
        );
    }
}
