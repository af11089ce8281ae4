//! Tiled inference over full-size images: the image is mirror-padded, cut into
//! overlapping tiles whose sides are multiples of the network's down-sampling, the
//! logits of overlapping tiles are averaged, and the arg-max is taken per pixel.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::data::{reflect, upscale_labels, Sample};
use super::executor::Network;

/// Tile layout along one axis: tile side and tile starts (in padded-free coordinates;
/// tiles may run past the image end, those pixels are mirrored).
fn starts(len: usize, tile: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let overlap = tile / 4;
    let stride = tile - overlap;
    let mut v: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s + tile < len)
        .collect();
    v.push(len - tile);
    v
}

fn round_up(v: usize, m: usize) -> usize {
    v.div_ceil(m) * m
}

/// Predicts class labels (`H × W`) for a whole image with tiles of at most
/// `tile × tile` pixels (rounded to the `multiple` the architecture needs).
pub fn predict(net: &Network, s: &Sample, tile: usize, multiple: usize) -> Result<Vec<u8>> {
    let (h, w, c) = (s.height, s.width, s.channels);
    let tile = round_up(tile.max(multiple), multiple);
    let th = tile.min(round_up(h, multiple));
    let tw = tile.min(round_up(w, multiple));
    let ys = starts(h, th);
    let xs = starts(w, tw);
    let plane = h * w;
    let mut acc: Vec<f32> = Vec::new();
    let mut count = vec![0u16; plane];
    let mut classes = 0;
    for &y0 in &ys {
        for &x0 in &xs {
            let mut buf = vec![0f32; c * th * tw];
            for ch in 0..c {
                for ty in 0..th {
                    let sy = reflect((y0 + ty) as i64, h);
                    for tx in 0..tw {
                        let sx = reflect((x0 + tx) as i64, w);
                        buf[(ch * th + ty) * tw + tx] = s.pixels[ch * plane + sy * w + sx];
                    }
                }
            }
            let x = Tensor::from_vec(buf, (1, c, th, tw), net.device())?;
            let logits = net.forward(&x, false)?.to_dtype(DType::F32)?;
            let k = logits.dim(1)?;
            if acc.is_empty() {
                classes = k;
                acc = vec![0f32; k * plane];
            }
            let l = logits.flatten_all()?.to_vec1::<f32>()?;
            for ty in 0..th.min(h - y0) {
                for tx in 0..tw.min(w - x0) {
                    let p = (y0 + ty) * w + x0 + tx;
                    count[p] += 1;
                    for cl in 0..k {
                        acc[cl * plane + p] += l[(cl * th + ty) * tw + tx];
                    }
                }
            }
        }
    }
    // Averaging does not change the arg-max, but keeps the sums comparable.
    let mut out = vec![0u8; plane];
    for p in 0..plane {
        let mut best = 0;
        for cl in 1..classes {
            if acc[cl * plane + p] > acc[best * plane + p] {
                best = cl;
            }
        }
        out[p] = best as u8;
    }
    debug_assert!(count.iter().all(|&n| n > 0));
    Ok(out)
}

/// [`predict`], then the labels mapped back to the full-resolution image
/// (`raw.height × raw.width`), to compare with [`Sample::full_mask`].
pub fn predict_full(net: &Network, s: &Sample, tile: usize, multiple: usize) -> Result<Vec<u8>> {
    let pred = predict(net, s, tile, multiple)?;
    Ok(upscale_labels(
        &pred,
        s.width,
        s.height,
        s.downscale,
        s.raw.width as usize,
        s.raw.height as usize,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_axis() {
        assert_eq!(starts(100, 128), vec![0]);
        assert_eq!(starts(128, 128), vec![0]);
        let s = starts(300, 128);
        assert_eq!(*s.last().unwrap() + 128, 300);
        for pair in s.windows(2) {
            assert!(pair[1] - pair[0] <= 128);
        }
    }
}
