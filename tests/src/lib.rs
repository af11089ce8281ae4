//! Helpers shared by ccnet's cross-crate tests: small deterministic models and
//! containers built from them.

use ccnet_host::container::{write, ModelSpec, TensorData};
use ccnet_host::pack::{fold_batch_norm, fuse_relu, FloatModel};
use ccnet_host::weights::{key, FloatTensor, WeightMap};
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::{DType, InputGeometry, Metadata};
use ccnet_shared::graph::{Graph, Op, ParamRole};

/// A deterministic pseudo-random sequence (xorshift64*), for weights and inputs.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Tensors for every parameter of `graph` in the given weight dtype (`F32`, `F16` or
/// `I8`; int8 weights get per-channel scales and `I32` biases), filled from `seed`.
pub fn random_tensors(graph: &[Op], weight_dtype: DType, seed: u64) -> Vec<TensorData> {
    let g = Graph::new_unchecked(graph);
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for (n, op) in g.nodes().iter().enumerate() {
        let node = n as u16;
        for &(role, dims) in op.param_tensors().as_slice() {
            let count: usize = dims.iter().map(|&d| d as usize).product();
            let values: Vec<f32> = (0..count).map(|_| rng.unit() * 0.5).collect();
            let (dtype, bytes) = match (weight_dtype, role) {
                (DType::F16, _) => (
                    DType::F16,
                    values
                        .iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
                (DType::I8, ParamRole::Weight) => (
                    DType::I8,
                    values.iter().map(|&v| (v * 254.0) as i8 as u8).collect(),
                ),
                (DType::I8, ParamRole::Bias) => (
                    DType::I32,
                    values
                        .iter()
                        .flat_map(|&v| ((v * 1000.0) as i32).to_le_bytes())
                        .collect(),
                ),
                _ => (
                    DType::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            };
            out.push(TensorData {
                node,
                role,
                dtype,
                dims,
                bytes,
            });
            if dtype == DType::I8 {
                let out_ch = match op {
                    Op::Conv2d(c) => c.out_channels,
                    Op::ConvTranspose2d(c) => c.out_channels,
                    _ => unreachable!("only convolutions have weights"),
                };
                let scales: Vec<f32> = (0..out_ch).map(|i| 0.01 + i as f32 * 1e-3).collect();
                out.push(TensorData::f32(
                    node,
                    ParamRole::WeightScale,
                    [out_ch, 1, 1, 1],
                    &scales,
                ));
            }
        }
    }
    out
}

/// A container for `graph` with random weights of `dtype`.
pub fn container_bytes(graph: &[Op], dtype: DType, seed: u64) -> Vec<u8> {
    let g = Graph::new(graph).expect("valid graph");
    let spec = ModelSpec {
        graph,
        activations: &[],
        input: InputGeometry {
            channels: g.input_channels(),
            height: 32,
            width: 32,
            scale: 1.0,
            offset: 0.0,
            standardize: false,
        },
        metadata: Metadata {
            arch: "test",
            alpha_num: 1,
            alpha_den: 1,
            dataset: "generated",
            ..Metadata::default()
        },
    };
    write(&spec, &random_tensors(graph, dtype, seed)).expect("container writes")
}

/// Copies bytes into a 16-byte aligned buffer (as a device would place a model in flash).
pub fn aligned(bytes: &[u8]) -> AlignedBytes {
    let mut words = vec![0u128; bytes.len().div_ceil(16)];
    bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    AlignedBytes {
        words,
        len: bytes.len(),
    }
}

/// Bytes stored at a 16-byte aligned address.
pub struct AlignedBytes {
    words: Vec<u128>,
    len: usize,
}

impl AlignedBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len]
    }
}

/// A deployed float model (trained with batch norm, then folded and ReLU-fused) of
/// `arch` at α = 1/`den` with He-like random weights, so activations neither vanish nor
/// blow up.
pub fn random_float_model(arch: Arch, den: u32, channels: u32, seed: u64) -> FloatModel {
    let graph = build(&ArchConfig {
        batch_norm: true,
        in_channels: channels,
        ..ArchConfig::new(arch, Alpha::new(1, den).expect("valid α"))
    })
    .expect("buildable");
    let g = Graph::new_unchecked(&graph);
    let mut rng = Rng::new(seed);
    let mut w = WeightMap::new();
    for (n, op) in graph.iter().enumerate() {
        let fan_in = match op {
            Op::Conv2d(c) => c.in_channels * u32::from(c.kernel).pow(2),
            Op::ConvTranspose2d(c) => {
                c.in_channels * u32::from(c.kernel).pow(2) / u32::from(c.stride).pow(2)
            }
            _ => 1,
        } as f32;
        for &(role, dims) in op.param_tensors().as_slice() {
            let count = dims.iter().product::<u32>() as usize;
            let values = (0..count)
                .map(|_| match role {
                    ParamRole::Weight => rng.unit() * (6.0 / fan_in).sqrt(),
                    ParamRole::RunningVar => 1.0 + 0.5 * rng.unit().abs(),
                    ParamRole::Gamma => 1.0 + 0.2 * rng.unit(),
                    _ => 0.1 * rng.unit(),
                })
                .collect();
            w.insert(
                key(&g, n as u16, role).expect("parameterised node"),
                FloatTensor {
                    dims: dims.iter().map(|&d| d as usize).collect(),
                    values,
                },
            );
        }
    }
    fuse_relu(&fold_batch_norm(&FloatModel { graph, weights: w }).expect("foldable"))
}
