//! Float weights by stable name, independent of any training framework, with
//! safetensors import and export so a network can come from or go to other tools.
//!
//! Names are `<param_name>.<role>` (`conv07.weight`, `bn05.running_var`, see
//! [`key`]); shapes are the natural ones (convolution `[out, in, k, k]`, transposed
//! convolution `[in, out, k, k]`, vectors `[n]`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ccnet_shared::graph::{Graph, NodeId, Op, ParamRole};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::fsutil::write_atomic;

/// One named float tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatTensor {
    /// Shape.
    pub dims: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Weights keyed by stable name.
pub type WeightMap = BTreeMap<String, FloatTensor>;

/// Errors reading or matching weights. Every variant names the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a safetensors file.
    #[error("{path}: not a safetensors file: {message}")]
    Format {
        /// The file.
        path: String,
        /// Decoder message.
        message: String,
    },
    /// A tensor has an element type that is not a float.
    #[error("{path}: tensor `{name}` has element type {dtype}, expected F32, F16 or BF16")]
    Dtype {
        /// The file.
        path: String,
        /// Tensor name.
        name: String,
        /// Its type.
        dtype: String,
    },
    /// A tensor the graph needs is absent.
    #[error("weights lack tensor `{name}` (node {node})")]
    Missing {
        /// Tensor name.
        name: String,
        /// Node.
        node: NodeId,
    },
    /// A tensor has the wrong number of elements for its node.
    #[error("tensor `{name}` has shape {dims:?} ({found} values); node {node} needs {expected}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Node.
        node: NodeId,
        /// Its shape.
        dims: Vec<usize>,
        /// Values found.
        found: usize,
        /// Values needed.
        expected: u64,
    },
}

/// The stable name of a node's parameter tensor (`conv07.weight`).
pub fn key(graph: &Graph<'_>, node: NodeId, role: ParamRole) -> Option<String> {
    graph
        .param_name(node)
        .map(|n| format!("{n}.{}", role.name()))
}

/// Checks that `weights` holds every parameter tensor of `graph` with the right size.
pub fn check_complete(graph: &[Op], weights: &WeightMap) -> Result<(), WeightsError> {
    let g = Graph::new_unchecked(graph);
    for (n, op) in graph.iter().enumerate() {
        let node = n as NodeId;
        for &(role, dims) in op.param_tensors().as_slice() {
            let name = key(&g, node, role).unwrap_or_default();
            let t = weights.get(&name).ok_or_else(|| WeightsError::Missing {
                name: name.clone(),
                node,
            })?;
            let expected: u64 = dims.iter().map(|&d| u64::from(d)).product();
            if t.values.len() as u64 != expected {
                return Err(WeightsError::Shape {
                    name,
                    node,
                    dims: t.dims.clone(),
                    found: t.values.len(),
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// Reads every tensor of a safetensors file as `f32` (F16 and BF16 are widened).
pub fn load_safetensors(path: &Path) -> Result<WeightMap, WeightsError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: p.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let mut out = WeightMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(WeightsError::Dtype {
                    path: p,
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(
            name,
            FloatTensor {
                dims: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// Writes `weights` as an F32 safetensors file (atomically), with string metadata.
pub fn save_safetensors(
    path: &Path,
    weights: &WeightMap,
    metadata: &HashMap<String, String>,
) -> Result<(), WeightsError> {
    let p = path.display().to_string();
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = weights
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.dims.clone(),
            )
        })
        .collect();
    let views = raw
        .iter()
        .map(|(k, b, d)| {
            TensorView::new(Dtype::F32, d.clone(), b)
                .map(|v| (k.as_str(), v))
                .map_err(|e| WeightsError::Format {
                    path: p.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let bytes = safetensors::serialize(views, meta).map_err(|e| WeightsError::Format {
        path: p.clone(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes).map_err(|source| WeightsError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_is_exact() {
        let mut w = WeightMap::new();
        w.insert(
            "conv00.weight".into(),
            FloatTensor {
                dims: vec![2, 1, 1, 1],
                values: vec![1.5, -0.25],
            },
        );
        w.insert(
            "conv00.bias".into(),
            FloatTensor {
                dims: vec![2],
                values: vec![f32::MIN_POSITIVE, 3.0e7],
            },
        );
        let dir = std::env::temp_dir().join(format!("ccnet-weights-{}", std::process::id()));
        let path = dir.join("w.safetensors");
        save_safetensors(&path, &w, &HashMap::new()).unwrap();
        assert_eq!(load_safetensors(&path).unwrap(), w);
        std::fs::write(&path, b"garbage").unwrap();
        let e = load_safetensors(&path).unwrap_err().to_string();
        assert!(
            e.contains("w.safetensors") && e.contains("not a safetensors"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
