//! The `.ccn` container, format version 1 (specified in `shared/FORMAT.md`).
//!
//! ```text
//! offset  size  field
//! 0       4     magic b"CCNM"
//! 4       2     format version (u16 LE) = 1
//! 6       2     reserved, 0
//! 8       4     header length H (u32 LE)
//! 12      4     data offset D (u32 LE, multiple of 16, ≥ 24 + H)
//! 16      4     data length L (u32 LE)
//! 20      4     reserved, 0
//! 24      H     header: postcard-encoded [`Header`]
//! 24+H    ..    zero padding up to D
//! D       L     tensor data, every tensor at a multiple of 16 from D
//! D+L     4     CRC-32 (IEEE) of bytes [0, D+L), u32 LE
//! ```
//!
//! [`Container::parse`] validates everything once and then borrows the tensor bytes in
//! place; it never allocates and never panics.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::graph::{Graph, GraphError, NodeId, Op, ParamRole, MAX_NODES};

/// First four bytes of every container.
pub const MAGIC: [u8; 4] = *b"CCNM";
/// The format version this code reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the header.
pub const PREAMBLE_LEN: usize = 24;
/// Alignment of the data section and of every tensor in it.
pub const ALIGN: usize = 16;
/// Bytes of the trailing CRC.
pub const CRC_LEN: usize = 4;
/// Most tensors a container may hold.
pub const MAX_TENSORS: usize = 160;

/// CRC-32 (IEEE 802.3, as used by zip and PNG).
pub const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// IEEE-754 binary32, little endian.
    F32,
    /// IEEE-754 binary16, little endian.
    F16,
    /// Signed 8-bit integer (weights with per-output-channel scales).
    I8,
    /// Signed 32-bit integer, little endian (int8 biases).
    I32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I8 => 1,
        }
    }

    /// Lower-case name (`f32`, `f16`, `i8`, `i32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I8 => "i8",
            DType::I32 => "i32",
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// The node that owns this tensor.
    pub node: NodeId,
    /// What the tensor is to that node.
    pub role: ParamRole,
    /// Element type.
    pub dtype: DType,
    /// Shape, unused trailing dimensions 1 (as [`Op::param_tensors`] gives them).
    pub dims: [u32; 4],
    /// Byte offset from the start of the data section (multiple of [`ALIGN`]).
    pub offset: u32,
    /// Byte length (elements × dtype size).
    pub len: u32,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().map(|&d| u64::from(d)).product()
    }
}

/// Per-node activation quantization (int8 models): `real = scale · (q − zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivationQuant {
    /// The node whose output this describes.
    pub node: NodeId,
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero_point: i32,
}

/// The input the model expects and how pixels become network input:
/// `x = pixel / 255 · scale + offset` per channel, where `scale` and `offset` are the
/// fields below, or, with `standardize`, computed per image and channel by
/// [`standardize_params`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputGeometry {
    /// Channels (1 gray, 3 RGB).
    pub channels: u32,
    /// Tile height the model was built and planned for.
    pub height: u32,
    /// Tile width.
    pub width: u32,
    /// Input normalisation scale.
    pub scale: f32,
    /// Input normalisation offset.
    pub offset: f32,
    /// Standardize each channel of each image to zero mean and unit deviation (over the
    /// whole image) instead of using `scale` and `offset`. At most
    /// [`MAX_STANDARDIZED_CHANNELS`] channels.
    pub standardize: bool,
}

/// Most input channels a standardized input may have.
pub const MAX_STANDARDIZED_CHANNELS: usize = 4;

/// Per-channel `(scale, offset)` that standardize an 8-bit planar `C × H × W` image:
/// with `v = p / 255` (in `f32`), `mean` and population `std` of `v` over the channel
/// (summed in `f64`), `scale = 1 / max(std, 1/255)` and `offset = −mean · scale`, both
/// computed in `f64` and rounded to `f32`. Channels beyond `channels` are `(1, 0)`.
/// Host and device call this one function, so they normalise identically.
pub fn standardize_params(
    pixels: &[u8],
    channels: usize,
) -> [(f32, f32); MAX_STANDARDIZED_CHANNELS] {
    let mut out = [(1.0f32, 0.0f32); MAX_STANDARDIZED_CHANNELS];
    let c = channels.clamp(1, MAX_STANDARDIZED_CHANNELS);
    let plane = pixels.len() / channels.max(1);
    if plane == 0 {
        return out;
    }
    for (ch, slot) in out.iter_mut().enumerate().take(c) {
        let px = &pixels[ch * plane..(ch + 1) * plane];
        let v = |p: u8| f64::from(f32::from(p) / 255.0);
        let mean = px.iter().map(|&p| v(p)).sum::<f64>() / plane as f64;
        let var = px
            .iter()
            .map(|&p| (v(p) - mean) * (v(p) - mean))
            .sum::<f64>()
            / plane as f64;
        let std = libm::sqrt(var).max(1.0 / 255.0);
        let scale = 1.0 / std;
        *slot = (scale as f32, (-mean * scale) as f32);
    }
    out
}

/// Descriptive metadata: where the model came from and what it was predicted and
/// measured to do. Strings are borrowed from the container bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata<'a> {
    /// Architecture name (`unet`, `fcn`, `cumed`).
    pub arch: &'a str,
    /// Width multiplier numerator.
    pub alpha_num: u32,
    /// Width multiplier denominator.
    pub alpha_den: u32,
    /// Dataset name the model was trained on.
    pub dataset: &'a str,
    /// Dataset complexity J (JPEG), if measured.
    pub complexity_j: Option<f32>,
    /// Dataset complexity B (blob density), if measured.
    pub complexity_b: Option<f32>,
    /// Dataset complexity JB, if measured.
    pub complexity_jb: Option<f32>,
    /// Predicted foreground F1.
    pub predicted_f1: Option<f32>,
    /// Predicted foreground IU.
    pub predicted_iu: Option<f32>,
    /// Measured foreground F1 (of this very file).
    pub measured_f1: Option<f32>,
    /// Measured foreground IU (of this very file).
    pub measured_iu: Option<f32>,
}

/// The postcard-encoded header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header<'a> {
    /// The graph, in topological order.
    pub graph: heapless::Vec<Op, MAX_NODES>,
    /// Tensor table.
    pub tensors: heapless::Vec<TensorInfo, MAX_TENSORS>,
    /// Activation quantization for int8 models (empty for float models).
    pub activations: heapless::Vec<ActivationQuant, MAX_NODES>,
    /// Expected input.
    pub input: InputGeometry,
    /// Metadata.
    #[serde(borrow)]
    pub metadata: Metadata<'a>,
}

/// Why a container was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The file is shorter than its layout says.
    Truncated {
        /// Bytes the layout needs.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// The file is longer than its layout says.
    TrailingBytes {
        /// Bytes the layout needs.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The first four bytes are not [`MAGIC`].
    BadMagic,
    /// A format version this reader does not know.
    UnsupportedVersion {
        /// Version in the file.
        found: u16,
        /// Version this reader supports.
        supported: u16,
    },
    /// A reserved preamble field is not zero.
    ReservedNotZero,
    /// Header and data offsets do not describe a valid layout.
    BadLayout,
    /// The stored CRC does not match the contents.
    CrcMismatch {
        /// CRC stored in the file.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
    /// The header bytes do not decode.
    BadHeader,
    /// The graph is invalid.
    Graph(GraphError),
    /// A tensor entry is inconsistent (bad node, role, shape, dtype, length or bounds).
    BadTensor {
        /// Index in the tensor table.
        index: u16,
    },
    /// A tensor is not aligned to [`ALIGN`] within the data section.
    Misaligned {
        /// Index in the tensor table.
        index: u16,
    },
    /// A node's parameter tensor is missing or present twice.
    MissingTensor {
        /// The node.
        node: NodeId,
        /// The missing role.
        role: ParamRole,
    },
    /// The input geometry disagrees with the graph.
    BadInput,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FormatError::Truncated { needed, found } => {
                write!(f, "truncated: needs {needed} bytes, has {found}")
            }
            FormatError::TrailingBytes { expected, found } => {
                write!(f, "unexpected trailing bytes: expected {expected} bytes, has {found}")
            }
            FormatError::BadMagic => write!(f, "not a ccnet model (bad magic number)"),
            FormatError::UnsupportedVersion { found, supported } => write!(
                f,
                "format version {found} is not supported (this build reads version {supported})"
            ),
            FormatError::ReservedNotZero => write!(f, "reserved preamble bytes are not zero"),
            FormatError::BadLayout => write!(f, "inconsistent header/data offsets"),
            FormatError::CrcMismatch { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupted"
            ),
            FormatError::BadHeader => write!(f, "the header does not decode"),
            FormatError::Graph(e) => write!(f, "invalid graph: {e}"),
            FormatError::BadTensor { index } => write!(f, "tensor {index} is inconsistent"),
            FormatError::Misaligned { index } => write!(f, "tensor {index} is misaligned"),
            FormatError::MissingTensor { node, role } => write!(
                f,
                "node {node} lacks its {} tensor (or has it twice)",
                role.name()
            ),
            FormatError::BadInput => write!(f, "input geometry disagrees with the graph"),
        }
    }
}

impl From<GraphError> for FormatError {
    fn from(e: GraphError) -> Self {
        FormatError::Graph(e)
    }
}

/// Rounds `x` up to a multiple of [`ALIGN`].
pub const fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// The fixed-size preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// Format version.
    pub version: u16,
    /// Header length.
    pub header_len: u32,
    /// Data section offset.
    pub data_offset: u32,
    /// Data section length.
    pub data_len: u32,
}

impl Preamble {
    /// The layout for a header of `header_len` bytes and `data_len` data bytes.
    pub fn for_lengths(header_len: usize, data_len: usize) -> Option<Preamble> {
        let data_offset = align_up(PREAMBLE_LEN.checked_add(header_len)?);
        Some(Preamble {
            version: FORMAT_VERSION,
            header_len: u32::try_from(header_len).ok()?,
            data_offset: u32::try_from(data_offset).ok()?,
            data_len: u32::try_from(data_len).ok()?,
        })
    }

    /// Total file length this preamble describes.
    pub fn file_len(&self) -> u64 {
        u64::from(self.data_offset) + u64::from(self.data_len) + CRC_LEN as u64
    }

    /// Encodes the preamble.
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.header_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.data_offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    /// Decodes and checks magic, version and reserved fields.
    pub fn decode(bytes: &[u8]) -> Result<Preamble, FormatError> {
        if bytes.len() < PREAMBLE_LEN {
            // Report a wrong magic before a short file, so foreign files are named as such.
            let n = bytes.len().min(4);
            if bytes[..n] != MAGIC[..n] {
                return Err(FormatError::BadMagic);
            }
            return Err(FormatError::Truncated {
                needed: (PREAMBLE_LEN + CRC_LEN) as u64,
                found: bytes.len() as u64,
            });
        }
        if bytes[0..4] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let version = u16_at(4);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if u16_at(6) != 0 || u32_at(20) != 0 {
            return Err(FormatError::ReservedNotZero);
        }
        let p = Preamble {
            version,
            header_len: u32_at(8),
            data_offset: u32_at(12),
            data_len: u32_at(16),
        };
        let header_end = PREAMBLE_LEN as u64 + u64::from(p.header_len);
        if u64::from(p.data_offset) < header_end || !(p.data_offset as usize).is_multiple_of(ALIGN)
        {
            return Err(FormatError::BadLayout);
        }
        Ok(p)
    }
}

/// A validated container borrowing its bytes.
#[derive(Clone, Debug)]
pub struct Container<'a> {
    header: Header<'a>,
    data: &'a [u8],
}

impl<'a> Container<'a> {
    /// Validates `bytes` completely (layout, CRC, header, graph, tensor table) and
    /// borrows them. Never panics, never allocates.
    pub fn parse(bytes: &'a [u8]) -> Result<Container<'a>, FormatError> {
        let pre = Preamble::decode(bytes)?;
        let expected = pre.file_len();
        let found = bytes.len() as u64;
        if found < expected {
            return Err(FormatError::Truncated {
                needed: expected,
                found,
            });
        }
        if found > expected {
            return Err(FormatError::TrailingBytes { expected, found });
        }
        let body_end = bytes.len() - CRC_LEN;
        let stored = u32::from_le_bytes([
            bytes[body_end],
            bytes[body_end + 1],
            bytes[body_end + 2],
            bytes[body_end + 3],
        ]);
        let computed = CRC32.checksum(&bytes[..body_end]);
        if stored != computed {
            return Err(FormatError::CrcMismatch { stored, computed });
        }
        let header_bytes = &bytes[PREAMBLE_LEN..PREAMBLE_LEN + pre.header_len as usize];
        let (header, rest): (Header<'a>, _) =
            postcard::take_from_bytes(header_bytes).map_err(|_| FormatError::BadHeader)?;
        if !rest.is_empty() {
            return Err(FormatError::BadHeader);
        }
        let data_start = pre.data_offset as usize;
        let data = &bytes[data_start..data_start + pre.data_len as usize];
        validate_header(&header, data.len())?;
        Ok(Container { header, data })
    }

    /// The decoded header.
    pub fn header(&self) -> &Header<'a> {
        &self.header
    }

    /// The graph.
    pub fn graph(&self) -> Graph<'_> {
        Graph::new_unchecked(&self.header.graph)
    }

    /// The tensor table.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The raw bytes of tensor `index` (validated in bounds at parse time).
    pub fn tensor_bytes(&self, index: usize) -> Option<&'a [u8]> {
        let t = self.header.tensors.get(index)?;
        self.data
            .get(t.offset as usize..t.offset as usize + t.len as usize)
    }

    /// The index of the tensor with this node and role.
    pub fn find(&self, node: NodeId, role: ParamRole) -> Option<usize> {
        self.header
            .tensors
            .iter()
            .position(|t| t.node == node && t.role == role)
    }

    /// Tensor `index` as `f32` values, borrowed in place; `None` if it is not `F32` or the
    /// caller's buffer is not 4-byte aligned in memory.
    pub fn tensor_f32(&self, index: usize) -> Option<&'a [f32]> {
        if self.header.tensors.get(index)?.dtype != DType::F32 {
            return None;
        }
        bytemuck::try_cast_slice(self.tensor_bytes(index)?).ok()
    }

    /// Tensor `index` as `i8` values.
    pub fn tensor_i8(&self, index: usize) -> Option<&'a [i8]> {
        if self.header.tensors.get(index)?.dtype != DType::I8 {
            return None;
        }
        bytemuck::try_cast_slice(self.tensor_bytes(index)?).ok()
    }

    /// Tensor `index` as `i32` values, borrowed in place (4-byte aligned buffers only).
    pub fn tensor_i32(&self, index: usize) -> Option<&'a [i32]> {
        if self.header.tensors.get(index)?.dtype != DType::I32 {
            return None;
        }
        bytemuck::try_cast_slice(self.tensor_bytes(index)?).ok()
    }

    /// Tensor `index` as raw `f16` bits, borrowed in place (2-byte aligned buffers only).
    pub fn tensor_f16_bits(&self, index: usize) -> Option<&'a [u16]> {
        if self.header.tensors.get(index)?.dtype != DType::F16 {
            return None;
        }
        bytemuck::try_cast_slice(self.tensor_bytes(index)?).ok()
    }
}

/// Which dtypes a role may be stored in.
fn dtype_allowed(role: ParamRole, dtype: DType) -> bool {
    match role {
        ParamRole::Weight => matches!(dtype, DType::F32 | DType::F16 | DType::I8),
        ParamRole::Bias => matches!(dtype, DType::F32 | DType::F16 | DType::I32),
        ParamRole::WeightScale => dtype == DType::F32,
        _ => matches!(dtype, DType::F32 | DType::F16),
    }
}

/// Checks graph, tensor table and input geometry against each other and the data length.
pub fn validate_header(header: &Header<'_>, data_len: usize) -> Result<(), FormatError> {
    let graph = Graph::new(&header.graph)?;
    if header.input.channels != graph.input_channels()
        || header.input.height == 0
        || header.input.width == 0
        || (header.input.standardize && header.input.channels as usize > MAX_STANDARDIZED_CHANNELS)
        || !header.input.scale.is_finite()
        || !header.input.offset.is_finite()
    {
        return Err(FormatError::BadInput);
    }
    for (i, t) in header.tensors.iter().enumerate() {
        let index = i as u16;
        let bad = FormatError::BadTensor { index };
        let op = header.graph.get(t.node as usize).ok_or(bad)?;
        if t.role == ParamRole::WeightScale {
            // One f32 scale per output channel of an int8 weight.
            let out = match op {
                Op::Conv2d(c) => c.out_channels,
                Op::ConvTranspose2d(c) => c.out_channels,
                _ => return Err(bad),
            };
            if t.dims != [out, 1, 1, 1] {
                return Err(bad);
            }
        } else {
            let expected = op
                .param_tensors()
                .as_slice()
                .iter()
                .find(|(r, _)| *r == t.role)
                .map(|(_, d)| *d)
                .ok_or(bad)?;
            if t.dims != expected {
                return Err(bad);
            }
        }
        if !dtype_allowed(t.role, t.dtype) {
            return Err(bad);
        }
        if t.elements() * t.dtype.size() as u64 != u64::from(t.len) {
            return Err(bad);
        }
        if u64::from(t.offset) + u64::from(t.len) > data_len as u64 {
            return Err(bad);
        }
        if !(t.offset as usize).is_multiple_of(ALIGN) {
            return Err(FormatError::Misaligned { index });
        }
    }
    // Every parameter tensor exactly once; int8 weights come with their scales.
    for (n, op) in header.graph.iter().enumerate() {
        let node = n as NodeId;
        let count = |role| {
            header
                .tensors
                .iter()
                .filter(|t| t.node == node && t.role == role)
                .count()
        };
        for &(role, _) in op.param_tensors().as_slice() {
            if count(role) != 1 {
                return Err(FormatError::MissingTensor { node, role });
            }
        }
        let int8 = header
            .tensors
            .iter()
            .any(|t| t.node == node && t.role == ParamRole::Weight && t.dtype == DType::I8);
        let scales = count(ParamRole::WeightScale);
        if (int8 && scales != 1) || (!int8 && scales != 0) {
            return Err(FormatError::MissingTensor {
                node,
                role: ParamRole::WeightScale,
            });
        }
    }
    Ok(())
}
