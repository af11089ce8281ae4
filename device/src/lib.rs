//! ccnet's device inference engine: `#![no_std]`, never allocates, never panics on bad
//! input.
//!
//! ```text
//! Model::parse(&bytes)?            validate the container once, borrow the weights
//! model.arena_bytes(h, w)?         exact scratch size for an h × w input
//! model.run(input, &mut arena, &mut mask)?         whole image
//! model.run_tiled(input, &mut arena, &mut mask)?   overlap-tile, any image size
//! ```
//!
//! Float models (weights `f32` or `f16`) compute in `f32`; int8 models (int8 weights with
//! per-output-channel scales, `i32` biases, per-tensor activation quantization) compute in
//! integers as specified in `shared/FORMAT.md` ("int8 execution semantics"). The
//! arithmetic lives in [`kernels`], the memory plan in [`plan`], tiling in [`tile`].
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod kernels;
pub mod plan;
pub mod tile;

mod exec;

use core::fmt;

use ccnet_shared::format::{Container, DType, FormatError};
use ccnet_shared::graph::{Graph, GraphError, NodeId, Op, ParamRole, Shape, MAX_NODES};

use kernels::{add_multiplier, ratio, OutputScale, QParams};
pub use plan::{ArenaPlan, ARENA_ALIGN};

/// Errors of the device engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// The container is invalid.
    Format(FormatError),
    /// The graph does not fit this input size.
    Graph(GraphError),
    /// A batch-norm node was not folded into its convolution by packing.
    UnfoldedBatchNorm {
        /// The batch-norm node.
        node: NodeId,
    },
    /// A tensor's element type does not fit the model's precision (float models take
    /// `f32`/`f16` weights and biases; int8 models `i8` weights and `i32` biases).
    UnsupportedDType {
        /// Index in the tensor table.
        tensor: u16,
    },
    /// An int8 model's quantization parameters are missing, duplicated or unusable
    /// (non-positive or non-finite scale, zero point outside `[-128, 127]`, a
    /// multiplier that fixed point cannot represent).
    BadQuant {
        /// The node concerned.
        node: NodeId,
    },
    /// The input normalisation (`scale`, `offset`) is not finite, or the planned tile
    /// size does not fit the graph.
    BadInputGeometry,
    /// The input slice does not hold `channels × height × width` values.
    InputLength {
        /// Values expected.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// The output slice has the wrong length.
    OutputLength {
        /// Values expected.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// The scratch arena is too small.
    ArenaTooSmall {
        /// Bytes needed (for this buffer's alignment).
        needed: usize,
        /// Bytes given.
        found: usize,
    },
    /// The model does not end in an arg-max over at most 256 classes, so it has no mask.
    NoMask,
    /// The requested node does not exist.
    BadNode {
        /// The node.
        node: NodeId,
    },
    /// The graph cannot be tiled (spatial factors that do not divide, or a halo that
    /// leaves no useful core in the planned tile).
    NotTileable,
    /// The image size is not a multiple of the graph's total down-sampling.
    ImageSize {
        /// Required multiple.
        multiple: u32,
    },
    /// A size does not fit this machine's address space.
    TooLarge,
    /// An internal consistency check failed (a bug; reported instead of panicking).
    Internal,
}

impl From<FormatError> for DeviceError {
    fn from(e: FormatError) -> Self {
        DeviceError::Format(e)
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DeviceError::Format(e) => write!(f, "{e}"),
            DeviceError::Graph(e) => write!(f, "{e}"),
            DeviceError::UnfoldedBatchNorm { node } => write!(
                f,
                "node {node} is a batch norm: pack the model so it is folded into its convolution"
            ),
            DeviceError::UnsupportedDType { tensor } => write!(
                f,
                "tensor {tensor} has an element type this model's precision does not use"
            ),
            DeviceError::BadQuant { node } => {
                write!(
                    f,
                    "node {node}: int8 quantization parameters missing or unusable"
                )
            }
            DeviceError::BadInputGeometry => {
                write!(f, "input normalisation or planned tile size is unusable")
            }
            DeviceError::InputLength { expected, found } => {
                write!(f, "input has {found} values, expected {expected}")
            }
            DeviceError::OutputLength { expected, found } => {
                write!(f, "output has {found} values, expected {expected}")
            }
            DeviceError::ArenaTooSmall { needed, found } => {
                write!(f, "arena of {found} bytes is too small, {needed} needed")
            }
            DeviceError::NoMask => write!(
                f,
                "the model does not end in an arg-max over at most 256 classes"
            ),
            DeviceError::BadNode { node } => write!(f, "node {node} does not exist"),
            DeviceError::NotTileable => write!(f, "the model cannot be run tile by tile"),
            DeviceError::ImageSize { multiple } => {
                write!(f, "image sides must be multiples of {multiple}")
            }
            DeviceError::TooLarge => write!(f, "sizes overflow this machine's address space"),
            DeviceError::Internal => write!(f, "internal error in the device engine"),
        }
    }
}

/// How a model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// `f32` arithmetic (weights stored `f32` or `f16`).
    Float,
    /// Integer arithmetic on int8 activations and weights.
    Int8,
}

/// Which kernels run the convolutions (both give identical results).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The plain reference kernels.
    Reference,
    /// The optimised kernels.
    #[default]
    Fast,
}

/// Input values, planar `C × H × W`.
#[derive(Clone, Copy, Debug)]
pub enum InputData<'i> {
    /// 8-bit pixels, normalised by the model's input geometry:
    /// `x = (p / 255) · scale + offset` in `f32`.
    Pixels(&'i [u8]),
    /// Network input values used as they are.
    F32(&'i [f32]),
}

/// An input image.
#[derive(Clone, Copy, Debug)]
pub struct Input<'i> {
    /// Values, planar `C × H × W`.
    pub data: InputData<'i>,
    /// Height.
    pub height: u32,
    /// Width.
    pub width: u32,
}

/// What a run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunInfo {
    /// Planned arena bytes (from the aligned start).
    pub planned_bytes: usize,
    /// Bytes skipped at the arena's start to reach [`ARENA_ALIGN`].
    pub align_skip: usize,
    /// Tiles run (1 for a whole-image run).
    pub tiles: u32,
}

/// A validated model borrowing its container bytes.
#[derive(Clone, Debug)]
pub struct Model<'a> {
    container: Container<'a>,
    precision: Precision,
    kernels: Kernels,
}

/// Fixed int8 output quantization of `Softmax`: scale 1/256, zero point −128.
pub const SOFTMAX_QUANT: QParams = QParams {
    scale: 1.0 / 256.0,
    zero_point: -128,
};

impl<'a> Model<'a> {
    /// Validates a container once: the container itself (magic, version, CRC, bounds,
    /// graph, tensor table), then what this engine needs (supported operations, no
    /// unfolded batch norm, consistent element types, complete and usable int8
    /// quantization, a planned tile the graph accepts). Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Model<'a>, DeviceError> {
        let container = Container::parse(bytes)?;
        let header = container.header();
        let precision = if header.activations.is_empty() {
            Precision::Float
        } else {
            Precision::Int8
        };
        for (n, op) in header.graph.iter().enumerate() {
            if let Op::BatchNorm { .. } = op {
                return Err(DeviceError::UnfoldedBatchNorm { node: n as NodeId });
            }
        }
        for (i, t) in header.tensors.iter().enumerate() {
            let ok = matches!(
                (precision, t.role, t.dtype),
                (
                    Precision::Float,
                    ParamRole::Weight | ParamRole::Bias,
                    DType::F32 | DType::F16
                ) | (Precision::Int8, ParamRole::Weight, DType::I8)
                    | (Precision::Int8, ParamRole::Bias, DType::I32)
                    | (Precision::Int8, ParamRole::WeightScale, DType::F32)
            );
            if !ok {
                return Err(DeviceError::UnsupportedDType { tensor: i as u16 });
            }
        }
        let input = header.input;
        if !(input.scale.is_finite() && input.offset.is_finite()) {
            return Err(DeviceError::BadInputGeometry);
        }
        let model = Model {
            container,
            precision,
            kernels: Kernels::Fast,
        };
        if precision == Precision::Int8 {
            model.validate_quant()?;
        }
        let mut shapes = [Shape::default(); MAX_NODES];
        model
            .graph()
            .infer_shapes(input.height, input.width, &mut shapes)
            .map_err(|_| DeviceError::BadInputGeometry)?;
        Ok(model)
    }

    /// The validated container.
    pub fn container(&self) -> &Container<'a> {
        &self.container
    }

    /// The graph.
    pub fn graph(&self) -> Graph<'_> {
        self.container.graph()
    }

    /// The model's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Chooses the convolution kernels (the fast ones by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// The planned tile size `(height, width)` from the container.
    pub fn tile_size(&self) -> (u32, u32) {
        let i = self.container.header().input;
        (i.height, i.width)
    }

    fn elem_bytes(&self) -> usize {
        match self.precision {
            Precision::Float => 4,
            Precision::Int8 => 1,
        }
    }

    fn last_node(&self) -> NodeId {
        (self.graph().len() - 1) as NodeId
    }

    /// The arena plan of a whole-image run on an `h × w` input.
    pub fn plan(&self, h: u32, w: u32) -> Result<ArenaPlan, DeviceError> {
        ArenaPlan::new(&self.graph(), h, w, self.elem_bytes(), self.last_node())
    }

    /// Scratch bytes [`Model::run`] needs for an `h × w` input in a buffer of any
    /// alignment: the planned bytes plus `ARENA_ALIGN − 1` for aligning its start. A
    /// buffer that starts 16-byte aligned needs exactly [`ArenaPlan::planned_bytes`].
    pub fn arena_bytes(&self, h: u32, w: u32) -> Result<usize, DeviceError> {
        Ok(self.plan(h, w)?.planned_bytes() + ARENA_ALIGN - 1)
    }

    /// Runs the whole image and writes the class of every pixel into `mask` (row major,
    /// the size of the final arg-max map: `height × width` for the built architectures).
    /// The model must end in an arg-max.
    pub fn run(
        &self,
        input: Input<'_>,
        arena: &mut [u8],
        mask: &mut [u8],
    ) -> Result<RunInfo, DeviceError> {
        self.check_mask_head()?;
        let plan = self.plan(input.height, input.width)?;
        // The mask has the arg-max map's size (the input's for the built architectures).
        let out = plan.shape(plan.target()).ok_or(DeviceError::Internal)?;
        let (h, w) = (out.h as usize, out.w as usize);
        let n = h * w;
        if mask.len() != n {
            return Err(DeviceError::OutputLength {
                expected: n,
                found: mask.len(),
            });
        }
        let view = exec::InputView::whole(input, self.graph().input_channels())?
            .normalised(&self.container().header().input);
        let (arena, skip) = exec::align_arena(arena, plan.planned_bytes())?;
        self.forward(&plan, &view, arena)?;
        let all = exec::Window {
            y0: 0,
            y1: h,
            x0: 0,
            x1: w,
        };
        exec::copy_mask(&plan, arena, all, mask, w, (0, 0))?;
        Ok(RunInfo {
            planned_bytes: plan.planned_bytes(),
            align_skip: skip,
            tiles: 1,
        })
    }

    /// Runs the graph up to `node` and writes that node's output as real values into
    /// `out` (`C × H × W`; int8 outputs dequantized, arg-max outputs as class indices).
    /// Returns the node's shape. Needs at most [`Model::arena_bytes`] of scratch.
    pub fn run_node(
        &self,
        input: Input<'_>,
        arena: &mut [u8],
        node: NodeId,
        out: &mut [f32],
    ) -> Result<Shape, DeviceError> {
        let plan = ArenaPlan::new(
            &self.graph(),
            input.height,
            input.width,
            self.elem_bytes(),
            node,
        )?;
        let shape = plan.shape(node).ok_or(DeviceError::Internal)?;
        let n = usize::try_from(shape.elements()).map_err(|_| DeviceError::TooLarge)?;
        if out.len() != n {
            return Err(DeviceError::OutputLength {
                expected: n,
                found: out.len(),
            });
        }
        let view = exec::InputView::whole(input, self.graph().input_channels())?
            .normalised(&self.container().header().input);
        let (arena, _) = exec::align_arena(arena, plan.planned_bytes())?;
        let q = self.forward(&plan, &view, arena)?;
        let is_argmax = matches!(self.graph().nodes()[node as usize], Op::Argmax { .. });
        exec::read_node(&plan, arena, node, &q, is_argmax, out)?;
        Ok(shape)
    }

    pub(crate) fn check_mask_head(&self) -> Result<(), DeviceError> {
        let g = self.graph();
        let nodes = g.nodes();
        let mut channels = [Shape::default(); MAX_NODES];
        let (h, w) = self.tile_size();
        g.infer_shapes(h, w, &mut channels)
            .map_err(|_| DeviceError::NoMask)?;
        match nodes.last() {
            Some(Op::Argmax { input }) if channels[*input as usize].c <= 256 => Ok(()),
            _ => Err(DeviceError::NoMask),
        }
    }

    pub(crate) fn forward(
        &self,
        plan: &ArenaPlan,
        input: &exec::InputView<'_>,
        arena: &mut [u8],
    ) -> Result<exec::QTable, DeviceError> {
        let q = match self.precision {
            Precision::Float => exec::QTable::none(),
            Precision::Int8 => self.quant_table()?,
        };
        exec::forward(self, plan, input, arena, &q)?;
        Ok(q)
    }

    /// Raw bytes of a node's parameter tensor.
    pub(crate) fn tensor(&self, node: NodeId, role: ParamRole) -> Option<(DType, &'a [u8])> {
        let i = self.container.find(node, role)?;
        let t = self.container.tensors().get(i)?;
        Some((t.dtype, self.container.tensor_bytes(i)?))
    }

    /// The explicit activation quantization entry of `node`, if any.
    fn explicit_quant(&self, node: NodeId) -> Option<QParams> {
        self.container
            .header()
            .activations
            .iter()
            .find(|a| a.node == node)
            .map(|a| QParams {
                scale: a.scale,
                zero_point: a.zero_point,
            })
    }

    /// Every node's effective output quantization (int8 models).
    pub(crate) fn quant_table(&self) -> Result<exec::QTable, DeviceError> {
        let mut t = exec::QTable::none();
        for (i, op) in self.graph().nodes().iter().enumerate() {
            let node = i as NodeId;
            let bad = DeviceError::BadQuant { node };
            let explicit = self.explicit_quant(node);
            let inherited = |k: usize| t.get(op.inputs().as_slice()[k]);
            t.q[i] = match op {
                Op::Input { .. }
                | Op::Conv2d(_)
                | Op::ConvTranspose2d(_)
                | Op::Concat { .. }
                | Op::Add { .. } => Some(explicit.ok_or(bad)?),
                Op::Relu { .. } | Op::MaxPool { .. } | Op::Upsample { .. } => {
                    Some(explicit.or(inherited(0)).ok_or(bad)?)
                }
                Op::Softmax { .. } => {
                    if explicit.is_some() {
                        return Err(bad);
                    }
                    Some(SOFTMAX_QUANT)
                }
                Op::Argmax { .. } => {
                    if explicit.is_some() {
                        return Err(bad);
                    }
                    None
                }
                Op::BatchNorm { .. } => return Err(DeviceError::UnfoldedBatchNorm { node }),
            };
        }
        Ok(t)
    }

    /// Checks the int8 quantization once at parse time, so runs cannot fail on it.
    fn validate_quant(&self) -> Result<(), DeviceError> {
        let acts = &self.container.header().activations;
        let n = self.graph().len();
        for (k, a) in acts.iter().enumerate() {
            let bad = DeviceError::BadQuant { node: a.node };
            if usize::from(a.node) >= n
                || !(a.scale.is_finite() && a.scale > 0.0)
                || !(-128..=127).contains(&a.zero_point)
                || acts[..k].iter().any(|b| b.node == a.node)
            {
                return Err(bad);
            }
        }
        let t = self.quant_table()?;
        for (i, op) in self.graph().nodes().iter().enumerate() {
            let node = i as NodeId;
            let bad = DeviceError::BadQuant { node };
            let qin = |k: usize| t.get(op.inputs().as_slice()[k]).ok_or(bad);
            let me = t.get(node);
            let rescale_ok = |from: QParams| {
                me.is_none_or(|to| from == to || ratio(from.scale, to.scale).is_some())
            };
            match *op {
                Op::Conv2d(_) | Op::ConvTranspose2d(_) => {
                    let (_, scales) = self.tensor(node, ParamRole::WeightScale).ok_or(bad)?;
                    let (cout, relu) = match *op {
                        Op::Conv2d(c) => (c.out_channels, c.relu),
                        Op::ConvTranspose2d(c) => (c.out_channels, c.relu),
                        _ => return Err(DeviceError::Internal),
                    };
                    let os = OutputScale {
                        weight_scales: scales,
                        input: qin(0)?,
                        output: me.ok_or(bad)?,
                        relu,
                    };
                    for oc in 0..cout as usize {
                        let s = kernels::f32_at(scales, oc);
                        if !(s.is_finite() && s > 0.0) || os.multiplier(oc).is_none() {
                            return Err(bad);
                        }
                    }
                }
                Op::Add { .. } => {
                    let out = me.ok_or(bad)?;
                    if add_multiplier(qin(0)?, out).is_none()
                        || add_multiplier(qin(1)?, out).is_none()
                    {
                        return Err(bad);
                    }
                }
                Op::Concat { .. } if !rescale_ok(qin(0)?) || !rescale_ok(qin(1)?) => {
                    return Err(bad);
                }
                Op::Relu { .. } | Op::MaxPool { .. } | Op::Upsample { .. }
                    if !rescale_ok(qin(0)?) =>
                {
                    return Err(bad);
                }
                _ => {}
            }
        }
        Ok(())
    }
}
