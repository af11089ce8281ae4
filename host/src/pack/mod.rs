//! Packing: a trained float network becomes a container that fits a byte budget.
//!
//! Steps: fold batch norm into the convolutions and fuse ReLUs ([`fold`]), convert the
//! weights to the storage type ([`Quant`]), write the container, and check the real
//! file length against the budget. A model that does not fit is refused with the
//! numbers that show why ([`PackError::OverBudget`]).

pub mod evaluate;
pub mod fold;
pub mod int8;
pub mod reference;

use ccnet_shared::format::{ActivationQuant, DType, InputGeometry, Metadata};
use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole};

use crate::container::{encoded_len, write, ModelSpec, TensorData, TensorMeta, WriteError};
use crate::weights::{key, WeightMap};
pub use fold::{fold_batch_norm, fuse_relu, FloatModel};

/// Storage type of the packed weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (weights and biases).
    F16,
    /// 8-bit integer weights with per-output-channel scales, 32-bit integer biases.
    Int8,
}

impl Quant {
    /// Name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Int8 => "int8",
        }
    }

    /// Bits per stored weight.
    pub fn bits(self) -> u32 {
        match self {
            Quant::F32 => 32,
            Quant::F16 => 16,
            Quant::Int8 => 8,
        }
    }

    fn weight_dtype(self) -> DType {
        match self {
            Quant::F32 => DType::F32,
            Quant::F16 => DType::F16,
            Quant::Int8 => DType::I8,
        }
    }

    fn bias_dtype(self) -> DType {
        match self {
            Quant::F32 => DType::F32,
            Quant::F16 => DType::F16,
            Quant::Int8 => DType::I32,
        }
    }
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Quant::F32),
            "f16" => Ok(Quant::F16),
            "int8" | "i8" => Ok(Quant::Int8),
            _ => Err(format!(
                "`{s}`: unknown storage type (expected f32, f16 or int8)"
            )),
        }
    }
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The file would exceed the budget.
    #[error(
        "the packed model needs {file_bytes} bytes, {over} bytes over the budget of {budget} bytes: \
         {params} parameters at {bits} bits = {weight_bytes} bytes of weights, plus {overhead} bytes of \
         header, quantization scales, alignment and checksum"
    )]
    OverBudget {
        /// Bytes of the file.
        file_bytes: u64,
        /// The budget.
        budget: u64,
        /// `file_bytes − budget`.
        over: u64,
        /// Parameters of the deployed network.
        params: u64,
        /// Bits per weight.
        bits: u32,
        /// `params · bits / 8`.
        weight_bytes: u64,
        /// Everything else in the file.
        overhead: u64,
    },
    /// int8 packing needs calibration inputs for the activation ranges.
    #[error("int8 packing needs calibration images to measure activation ranges")]
    NeedsCalibration,
    /// Running the float model on calibration inputs failed.
    #[error("calibration run: {0}")]
    Reference(reference::ReferenceError),
    /// The graph still has batch norm (fold it first).
    #[error("node {0} is a batch norm; fold batch norm before packing")]
    UnfoldedBatchNorm(NodeId),
    /// Weights missing or mis-sized.
    #[error("{0}")]
    Weights(#[from] crate::weights::WeightsError),
    /// Writing the container failed.
    #[error("{0}")]
    Write(#[from] WriteError),
}

/// Where the model came from and how it is fed, for the container header.
#[derive(Clone, Debug)]
pub struct PackInfo<'a> {
    /// Expected input.
    pub input: InputGeometry,
    /// Metadata.
    pub metadata: Metadata<'a>,
}

/// The tensors' descriptions for a deployed graph stored as `quant`.
pub fn tensor_metas(graph: &[Op], quant: Quant) -> Result<Vec<TensorMeta>, PackError> {
    let mut out = Vec::new();
    for (n, op) in graph.iter().enumerate() {
        let node = n as NodeId;
        if matches!(op, Op::BatchNorm { .. }) {
            return Err(PackError::UnfoldedBatchNorm(node));
        }
        for &(role, dims) in op.param_tensors().as_slice() {
            let dtype = match role {
                ParamRole::Weight => quant.weight_dtype(),
                _ => quant.bias_dtype(),
            };
            out.push(TensorMeta {
                node,
                role,
                dtype,
                dims,
            });
            if role == ParamRole::Weight && quant == Quant::Int8 {
                out.push(TensorMeta {
                    node,
                    role: ParamRole::WeightScale,
                    dtype: DType::F32,
                    dims: [dims_out(op), 1, 1, 1],
                });
            }
        }
    }
    Ok(out)
}

fn dims_out(op: &Op) -> u32 {
    match op {
        Op::Conv2d(c) => c.out_channels,
        Op::ConvTranspose2d(c) => c.out_channels,
        _ => 0,
    }
}

/// Bytes of the container for a deployed graph stored as `quant`, without weights
/// (what selection uses to test a disk budget). Exact for f32 and f16; for int8 an
/// upper bound that is at most a few bytes above the real file (the activation table
/// is counted with its largest encoding).
pub fn packed_len(graph: &[Op], quant: Quant, info: &PackInfo<'_>) -> Result<u64, PackError> {
    let metas = tensor_metas(graph, quant)?;
    let activations: Vec<ActivationQuant> = if quant == Quant::Int8 {
        int8::quantized_nodes(graph)
            .map(|node| ActivationQuant {
                node,
                scale: 1.0,
                zero_point: -128,
            })
            .collect()
    } else {
        Vec::new()
    };
    let spec = ModelSpec {
        graph,
        activations: &activations,
        input: info.input,
        metadata: info.metadata,
    };
    Ok(encoded_len(&spec, &metas)?)
}

fn float_tensors(
    graph: &[Op],
    weights: &WeightMap,
    quant: Quant,
) -> Result<Vec<TensorData>, PackError> {
    crate::weights::check_complete(graph, weights)?;
    let g = Graph::new_unchecked(graph);
    let metas = tensor_metas(graph, quant)?;
    Ok(metas
        .iter()
        .map(|m| {
            let name = key(&g, m.node, m.role).unwrap_or_default();
            let values = &weights[&name].values;
            let bytes = match m.dtype {
                DType::F16 => values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            TensorData {
                node: m.node,
                role: m.role,
                dtype: m.dtype,
                dims: m.dims,
                bytes,
            }
        })
        .collect())
}

/// Packs a deployed float model (batch norm folded) as `quant`, refusing when the real
/// file would exceed `budget`.
pub fn pack(
    model: &FloatModel,
    quant: Quant,
    budget: Option<u64>,
    info: &PackInfo<'_>,
) -> Result<Vec<u8>, PackError> {
    let tensors = match quant {
        Quant::F32 | Quant::F16 => float_tensors(&model.graph, &model.weights, quant)?,
        Quant::Int8 => return Err(PackError::NeedsCalibration),
    };
    let spec = ModelSpec {
        graph: &model.graph,
        activations: &[],
        input: info.input,
        metadata: info.metadata,
    };
    let bytes = write(&spec, &tensors)?;
    if let Some(budget) = budget {
        check_budget(&model.graph, quant, bytes.len() as u64, budget)?;
    }
    Ok(bytes)
}

/// Packs as `quant`; int8 measures activation ranges on `calibration` inputs (planar,
/// normalised, with their heights and widths) first.
pub fn pack_calibrated(
    model: &FloatModel,
    quant: Quant,
    budget: Option<u64>,
    info: &PackInfo<'_>,
    calibration: &[(Vec<f32>, u32, u32)],
) -> Result<Vec<u8>, PackError> {
    if quant != Quant::Int8 {
        return pack(model, quant, budget, info);
    }
    if calibration.is_empty() {
        return Err(PackError::NeedsCalibration);
    }
    let ranges = int8::measure_ranges(model, info, calibration)?;
    let bytes = int8::pack_int8(model, info, &ranges)?;
    if let Some(budget) = budget {
        check_budget(&model.graph, quant, bytes.len() as u64, budget)?;
    }
    Ok(bytes)
}

/// `Ok` when `file_bytes ≤ budget`, else [`PackError::OverBudget`] with the breakdown.
pub fn check_budget(
    graph: &[Op],
    quant: Quant,
    file_bytes: u64,
    budget: u64,
) -> Result<(), PackError> {
    if file_bytes <= budget {
        return Ok(());
    }
    let params = Graph::new_unchecked(graph).trainable_params();
    let weight_bytes = params * u64::from(quant.bits()) / 8;
    Err(PackError::OverBudget {
        file_bytes,
        budget,
        over: file_bytes - budget,
        params,
        bits: quant.bits(),
        weight_bytes,
        overhead: file_bytes.saturating_sub(weight_bytes),
    })
}
