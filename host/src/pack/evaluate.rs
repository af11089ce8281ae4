//! Accuracy of exactly what will be flashed: a packed container evaluated with the
//! device engine (tiled, as on the device) on a dataset.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use ccnet_device::{Input, InputData, Model};
use serde::Serialize;

use crate::dataset::{load_pair, Dataset, Image8};
use crate::train::metrics::{summarize, Confusion, Summary};

/// One image's result.
#[derive(Clone, Debug, Serialize)]
pub struct PackedImageResult {
    /// Item id.
    pub id: String,
    /// Foreground F1.
    pub f1: f64,
    /// Foreground IU.
    pub iu: f64,
    /// Device-engine time on this host, milliseconds.
    pub latency_ms: f64,
}

/// A packed model's evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct PackedEval {
    /// Means over images.
    pub mean: Summary,
    /// Mean latency per image, milliseconds.
    pub mean_latency_ms: f64,
    /// Arena bytes of the tiled run of the largest image.
    pub arena_bytes: usize,
    /// Per image.
    pub per_image: Vec<PackedImageResult>,
}

/// The image as planar `C × H × W` with `channels` channels, zero-padded on the right
/// and bottom to multiples of `multiple`; returns the padded size.
pub fn planar_padded(img: &Image8, channels: u32, multiple: u32) -> (Vec<u8>, u32, u32) {
    let img = if channels == 3 {
        img.to_rgb()
    } else {
        img.to_gray()
    };
    let (w, h) = (img.width, img.height);
    let ph = h.div_ceil(multiple) * multiple;
    let pw = w.div_ceil(multiple) * multiple;
    let c = channels as usize;
    let mut out = vec![0u8; c * (ph * pw) as usize];
    for ch in 0..c {
        for y in 0..h as usize {
            for x in 0..w as usize {
                out[(ch * ph as usize + y) * pw as usize + x] =
                    img.data[(y * w as usize + x) * c + ch];
            }
        }
    }
    (out, ph, pw)
}

/// A packed model loaded for the device engine (an aligned copy of its bytes).
pub struct LoadedModel {
    words: Vec<u128>,
    len: usize,
}

impl LoadedModel {
    /// Copies the container into 16-byte aligned memory (the engine borrows weights in
    /// place) and checks that it parses.
    pub fn new(bytes: &[u8]) -> Result<LoadedModel> {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        bytemuck_bytes(&mut words, bytes.len()).copy_from_slice(bytes);
        let m = LoadedModel {
            words,
            len: bytes.len(),
        };
        m.model()?;
        Ok(m)
    }

    /// The parsed model.
    pub fn model(&self) -> Result<Model<'_>> {
        let bytes = &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len];
        Model::parse(bytes).map_err(|e| anyhow!("not a usable model: {e}"))
    }
}

/// Segments one image of any size with the device engine (tiled, zero-padded to the
/// graph's down-sampling multiple): the class of every pixel, and the arena bytes used.
pub fn segment_image(
    model: &Model<'_>,
    img: &Image8,
    arena: &mut Vec<u8>,
) -> Result<(Vec<u8>, usize)> {
    let channels = model.container().header().input.channels;
    let multiple = ccnet_device::tile::geometry(&model.graph())
        .map_err(|e| anyhow!("device engine: {e}"))?
        .multiple;
    let (pixels, ph, pw) = planar_padded(img, channels, multiple);
    let need = model
        .tiled_arena_bytes(ph, pw)
        .map_err(|e| anyhow!("device engine: {e}"))?;
    if arena.len() < need {
        arena.resize(need, 0);
    }
    let mut out = vec![0u8; (ph * pw) as usize];
    model
        .run_tiled(
            Input {
                data: InputData::Pixels(&pixels),
                height: ph,
                width: pw,
            },
            arena,
            &mut out,
        )
        .map_err(|e| anyhow!("device engine: {e}"))?;
    let mask = (0..img.height as usize)
        .flat_map(|y| out[y * pw as usize..y * pw as usize + img.width as usize].to_vec())
        .collect();
    Ok((mask, need))
}

/// Runs the packed model over every image of `ids` (all when empty) in `dataset_dir`.
pub fn evaluate_packed(bytes: &[u8], dataset_dir: &Path, ids: &[String]) -> Result<PackedEval> {
    let loaded = LoadedModel::new(bytes)?;
    let model = loaded.model()?;
    let ds = Dataset::open(dataset_dir, true)?;
    let mut per_image = Vec::new();
    let mut confusions = Vec::new();
    let mut arena_bytes = 0;
    let mut arena: Vec<u8> = Vec::new();
    for item in ds
        .items
        .iter()
        .filter(|i| ids.is_empty() || ids.contains(&i.id))
    {
        let (img, mask) = load_pair(item, None)?;
        let t0 = Instant::now();
        let (pred, need) = segment_image(&model, &img, &mut arena)
            .map_err(|e| anyhow!("{}: {e}", item.image.display()))?;
        let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
        arena_bytes = arena_bytes.max(need);
        let c = Confusion::of(&pred, &mask.data);
        per_image.push(PackedImageResult {
            id: item.id.clone(),
            f1: c.f1(),
            iu: c.iu(),
            latency_ms,
        });
        confusions.push(c);
    }
    if per_image.is_empty() {
        return Err(anyhow!("{}: no images to evaluate", dataset_dir.display()));
    }
    let mean_latency_ms =
        per_image.iter().map(|r| r.latency_ms).sum::<f64>() / per_image.len() as f64;
    Ok(PackedEval {
        mean: summarize(&confusions),
        mean_latency_ms,
        arena_bytes,
        per_image,
    })
}

fn bytemuck_bytes(words: &mut [u128], len: usize) -> &mut [u8] {
    &mut bytemuck::cast_slice_mut::<u128, u8>(words)[..len]
}
