//! Writes `.ccn` containers (format in `shared/FORMAT.md`); every file written is parsed
//! back with the device-side reader before it is returned, so writer and reader can
//! never disagree silently.

use ccnet_shared::format::{
    align_up, validate_header, ActivationQuant, Container, DType, FormatError, Header,
    InputGeometry, Metadata, Preamble, TensorInfo, CRC32, MAX_TENSORS,
};
use ccnet_shared::graph::{NodeId, Op, ParamRole, MAX_NODES};

/// One tensor to store: its owner, role, element type, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// Owning node.
    pub node: NodeId,
    /// Role for that node.
    pub role: ParamRole,
    /// Element type of `bytes`.
    pub dtype: DType,
    /// Shape (unused trailing dimensions 1).
    pub dims: [u32; 4],
    /// Little-endian element bytes.
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// An `f32` tensor.
    pub fn f32(node: NodeId, role: ParamRole, dims: [u32; 4], values: &[f32]) -> Self {
        TensorData {
            node,
            role,
            dtype: DType::F32,
            dims,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Everything a container holds besides the tensors.
#[derive(Clone, Debug)]
pub struct ModelSpec<'a> {
    /// The graph.
    pub graph: &'a [Op],
    /// Activation quantization (int8 models only).
    pub activations: &'a [ActivationQuant],
    /// Expected input.
    pub input: InputGeometry,
    /// Metadata.
    pub metadata: Metadata<'a>,
}

/// Why a container could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// More nodes or tensors than the format holds.
    #[error("the model has too many {what} for the container ({count} > {max})")]
    TooMany {
        /// What overflowed.
        what: &'static str,
        /// How many there were.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A tensor's byte length does not match its shape and dtype.
    #[error("tensor for node {node} ({role:?}) has {found} bytes, its shape needs {expected}")]
    TensorLength {
        /// Owning node.
        node: NodeId,
        /// Role.
        role: ParamRole,
        /// Bytes expected.
        expected: u64,
        /// Bytes given.
        found: usize,
    },
    /// The header does not serialise.
    #[error("header encoding failed: {0}")]
    Encode(#[from] postcard::Error),
    /// The result does not validate (the model itself is inconsistent).
    #[error("the container does not validate: {0}")]
    Invalid(FormatError),
    /// The file would exceed 4 GiB.
    #[error("the model is too large for format version 1 (over 4 GiB)")]
    TooLarge,
}

/// A tensor's description without its bytes, for computing exact file sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// Owning node.
    pub node: NodeId,
    /// Role for that node.
    pub role: ParamRole,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub dims: [u32; 4],
}

impl TensorData {
    /// The description of this tensor.
    pub fn meta(&self) -> TensorMeta {
        TensorMeta {
            node: self.node,
            role: self.role,
            dtype: self.dtype,
            dims: self.dims,
        }
    }
}

/// Builds the header (tensor offsets included) and the data-section length.
fn build_header<'a>(
    spec: &ModelSpec<'a>,
    tensors: &[TensorMeta],
) -> Result<(Header<'a>, usize), WriteError> {
    let mut header = Header {
        graph: heapless::Vec::new(),
        tensors: heapless::Vec::new(),
        activations: heapless::Vec::new(),
        input: spec.input,
        metadata: spec.metadata,
    };
    header
        .graph
        .extend_from_slice(spec.graph)
        .map_err(|_| WriteError::TooMany {
            what: "nodes",
            count: spec.graph.len(),
            max: MAX_NODES,
        })?;
    header
        .activations
        .extend_from_slice(spec.activations)
        .map_err(|_| WriteError::TooMany {
            what: "activation entries",
            count: spec.activations.len(),
            max: MAX_NODES,
        })?;
    let mut data_len = 0usize;
    for t in tensors {
        let bytes = t.dims.iter().map(|&d| u64::from(d)).product::<u64>() * t.dtype.size() as u64;
        let offset = align_up(data_len);
        let info = TensorInfo {
            node: t.node,
            role: t.role,
            dtype: t.dtype,
            dims: t.dims,
            offset: u32::try_from(offset).map_err(|_| WriteError::TooLarge)?,
            len: u32::try_from(bytes).map_err(|_| WriteError::TooLarge)?,
        };
        header.tensors.push(info).map_err(|_| WriteError::TooMany {
            what: "tensors",
            count: tensors.len(),
            max: MAX_TENSORS,
        })?;
        data_len = offset + bytes as usize;
    }
    validate_header(&header, data_len).map_err(WriteError::Invalid)?;
    Ok((header, data_len))
}

/// Exact size in bytes of the container [`write`] would produce for tensors of these
/// shapes and types, without needing their values.
pub fn encoded_len(spec: &ModelSpec<'_>, tensors: &[TensorMeta]) -> Result<u64, WriteError> {
    let (header, data_len) = build_header(spec, tensors)?;
    let header_bytes = postcard::to_allocvec(&header)?;
    let pre = Preamble::for_lengths(header_bytes.len(), data_len).ok_or(WriteError::TooLarge)?;
    Ok(pre.file_len())
}

/// Serialises a model into container bytes and validates them with the reader.
pub fn write(spec: &ModelSpec<'_>, tensors: &[TensorData]) -> Result<Vec<u8>, WriteError> {
    for t in tensors {
        let expected =
            t.dims.iter().map(|&d| u64::from(d)).product::<u64>() * t.dtype.size() as u64;
        if expected != t.bytes.len() as u64 {
            return Err(WriteError::TensorLength {
                node: t.node,
                role: t.role,
                expected,
                found: t.bytes.len(),
            });
        }
    }
    let metas: Vec<TensorMeta> = tensors.iter().map(TensorData::meta).collect();
    let (header, data_len) = build_header(spec, &metas)?;
    let header_bytes = postcard::to_allocvec(&header)?;
    let pre = Preamble::for_lengths(header_bytes.len(), data_len).ok_or(WriteError::TooLarge)?;
    let total = usize::try_from(pre.file_len()).map_err(|_| WriteError::TooLarge)?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&pre.encode());
    out.extend_from_slice(&header_bytes);
    out.resize(pre.data_offset as usize, 0);
    let data_start = out.len();
    for (t, info) in tensors.iter().zip(header.tensors.iter()) {
        out.resize(data_start + info.offset as usize, 0);
        out.extend_from_slice(&t.bytes);
    }
    out.resize(data_start + data_len, 0);
    let crc = CRC32.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), total);
    Container::parse(&out).map_err(WriteError::Invalid)?;
    Ok(out)
}
