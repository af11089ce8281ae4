//! Safetensors files of a run, written atomically: `weights.safetensors` (the network's
//! named tensors, with the run configuration as metadata) and `checkpoint.safetensors`
//! (the latest weights, Adam's moments and the training state as JSON metadata, in one
//! file so a crash can never pair weights with a foreign optimizer state).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};

use crate::fsutil::write_atomic;

/// Metadata key holding the JSON training state in a checkpoint.
pub const STATE_KEY: &str = "ccnet.state";
/// Metadata key holding the JSON run configuration in a weights file.
pub const CONFIG_KEY: &str = "ccnet.config";

/// Writes named tensors and string metadata to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    // Bring tensors to the CPU first so the file does not depend on the device.
    let cpu: BTreeMap<&String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(cpu.iter().map(|(k, t)| (*k, t)), Some(metadata))
        .with_context(|| format!("{}: cannot serialise tensors", path.display()))?;
    write_atomic(path, &bytes).with_context(|| format!("{}: cannot write", path.display()))
}

/// Reads a safetensors file: its tensors (on `device`) and its metadata.
pub fn load(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: bad safetensors header: {e}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        tensors.insert(name, t);
    }
    Ok((tensors, metadata))
}
