//! Training data: images held in memory as standardized `f32` planes, and random
//! augmented crops assembled into batches.
//!
//! Input normalisation (stated once, also recorded in `config.json` as
//! `per_image_standardize`): each channel of an image is mapped to
//! `(v/255 − mean) / max(std, 1/255)`, mean and std of that channel over the whole image.
//! Evaluation and packed inference must apply the same rule.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::rng::Rng;
use crate::dataset::{load_pair, Dataset, Image8, Mask};

/// Name of the input normalisation recorded in run folders.
pub const INPUT_NORM: &str = "per_image_standardize";

/// One image ready for training or inference.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Dataset item id (file stem).
    pub id: String,
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Standardized pixels, `C × H × W`.
    pub pixels: Vec<f32>,
    /// Mask, `H × W`, values in `0..classes`.
    pub mask: Vec<u8>,
    /// Indices (`y·W + x`) of the foreground pixels, for foreground-aware crops.
    pub foreground: Vec<u32>,
    /// The 8-bit image at full resolution (for overlays), `C` channels interleaved.
    pub raw: Image8,
    /// Integer factor by which the network's input is smaller than the image.
    pub downscale: usize,
    /// The mask at full resolution (`raw.height × raw.width`), for metrics.
    pub full_mask: Vec<u8>,
}

/// Standardizes an 8-bit interleaved image into `C × H × W` planes.
pub fn standardize(img: &Image8) -> Vec<f32> {
    let c = img.channels as usize;
    let n = (img.width * img.height) as usize;
    let mut out = vec![0f32; c * n];
    for ch in 0..c {
        let plane = &mut out[ch * n..(ch + 1) * n];
        for (i, p) in plane.iter_mut().enumerate() {
            *p = f32::from(img.data[i * c + ch]) / 255.0;
        }
        let mean = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = plane
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let std = var.sqrt().max(1.0 / 255.0);
        for p in plane.iter_mut() {
            *p = ((f64::from(*p) - mean) / std) as f32;
        }
    }
    out
}

/// Box-averages an image by the integer factor `f` (the last `side mod f` rows and
/// columns are dropped; a side shorter than `f` keeps one pixel).
pub fn downscale_image(img: &Image8, f: usize) -> Image8 {
    if f <= 1 {
        return img.clone();
    }
    let (w, h, c) = (
        img.width as usize,
        img.height as usize,
        img.channels as usize,
    );
    let (ow, oh) = ((w / f).max(1), (h / f).max(1));
    let mut data = vec![0u8; ow * oh * c];
    for oy in 0..oh {
        for ox in 0..ow {
            for ch in 0..c {
                let mut sum = 0u32;
                let mut n = 0u32;
                for y in oy * f..((oy + 1) * f).min(h) {
                    for x in ox * f..((ox + 1) * f).min(w) {
                        sum += u32::from(img.data[(y * w + x) * c + ch]);
                        n += 1;
                    }
                }
                data[(oy * ow + ox) * c + ch] = ((sum + n / 2) / n.max(1)) as u8;
            }
        }
    }
    Image8 {
        width: ow as u32,
        height: oh as u32,
        channels: img.channels,
        data,
    }
}

/// Downscales a label mask by `f`: each block takes its most frequent label (ties to
/// the foreground).
pub fn downscale_mask(mask: &[u8], w: usize, h: usize, f: usize) -> Vec<u8> {
    if f <= 1 {
        return mask.to_vec();
    }
    let (ow, oh) = ((w / f).max(1), (h / f).max(1));
    let mut out = vec![0u8; ow * oh];
    for oy in 0..oh {
        for ox in 0..ow {
            let (mut fg, mut n) = (0usize, 0usize);
            for y in oy * f..((oy + 1) * f).min(h) {
                for x in ox * f..((ox + 1) * f).min(w) {
                    fg += usize::from(mask[y * w + x] != 0);
                    n += 1;
                }
            }
            out[oy * ow + ox] = u8::from(2 * fg >= n.max(1));
        }
    }
    out
}

/// Maps a prediction at network resolution (`w × h`, from an image downscaled by `f`)
/// back to the full `full_w × full_h` image (nearest neighbour; edge pixels dropped by
/// the downscale take the nearest block).
pub fn upscale_labels(
    pred: &[u8],
    w: usize,
    h: usize,
    f: usize,
    full_w: usize,
    full_h: usize,
) -> Vec<u8> {
    if f <= 1 && (w, h) == (full_w, full_h) {
        return pred.to_vec();
    }
    let mut out = vec![0u8; full_w * full_h];
    for y in 0..full_h {
        let sy = (y / f.max(1)).min(h - 1);
        for x in 0..full_w {
            let sx = (x / f.max(1)).min(w - 1);
            out[y * full_w + x] = pred[sy * w + sx];
        }
    }
    out
}

/// Builds a sample from an image (converted to `channels`) and its mask; the network
/// sees the image downscaled by the integer factor `downscale` (1: full resolution).
pub fn sample(id: &str, img: &Image8, mask: &Mask, channels: u32, downscale: u32) -> Sample {
    let img = if channels == 3 {
        img.to_rgb()
    } else {
        img.to_gray()
    };
    let f = downscale.max(1) as usize;
    let small = downscale_image(&img, f);
    let small_mask = downscale_mask(&mask.data, mask.width as usize, mask.height as usize, f);
    let foreground = small_mask
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0)
        .map(|(i, _)| i as u32)
        .collect();
    Sample {
        id: id.to_string(),
        channels: channels as usize,
        height: small.height as usize,
        width: small.width as usize,
        pixels: standardize(&small),
        mask: small_mask,
        foreground,
        raw: img,
        downscale: f,
        full_mask: mask.data.clone(),
    }
}

/// Loads every listed item of `ds` (in parallel) as samples with `channels` channels,
/// downscaled by `downscale`.
pub fn load_samples(
    ds: &Dataset,
    ids: &[String],
    channels: u32,
    downscale: u32,
) -> Result<Vec<Sample>> {
    use rayon::prelude::*;
    let items: Vec<_> = ids
        .iter()
        .map(|id| {
            ds.items
                .iter()
                .find(|it| &it.id == id)
                .ok_or_else(|| anyhow::anyhow!("{}: no image `{id}`", ds.dir.display()))
        })
        .collect::<Result<_>>()?;
    items
        .par_iter()
        .map(|item| {
            let (img, mask) = load_pair(item, None)?;
            Ok(sample(&item.id, &img, &mask, channels, downscale))
        })
        .collect()
}

/// Mirror-reflects index `i` into `0..n` (`…2 1 0 1 2 … n−1 n−2 …`).
pub fn reflect(i: i64, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as i64 - 1);
    let mut r = i.rem_euclid(period);
    if r >= n as i64 {
        r = period - r;
    }
    r as usize
}

/// Augmentation settings.
#[derive(Clone, Copy, Debug)]
pub struct Augment {
    /// Probability that a crop is centred (with jitter) on a random foreground pixel.
    pub foreground_crop: f64,
    /// Random flips and 90° rotations (rotations only for square crops).
    pub geometric: bool,
    /// Largest relative gain change and additive shift of the standardized intensities.
    pub intensity: f32,
}

/// A batch: inputs `(N, C, H, W)`, one-hot targets `(N, classes, H, W)`.
pub struct Batch {
    /// Network input.
    pub x: Tensor,
    /// One-hot targets.
    pub onehot: Tensor,
}

/// Draws `n` random augmented `h × w` crops from `samples`.
pub fn random_batch(
    samples: &[Sample],
    n: usize,
    (h, w): (usize, usize),
    classes: usize,
    aug: &Augment,
    rng: &mut Rng,
    device: &Device,
) -> Result<Batch> {
    if samples.is_empty() {
        bail!("no training images");
    }
    let c = samples[0].channels;
    let mut xs = vec![0f32; n * c * h * w];
    let mut ys = vec![0f32; n * classes * h * w];
    for b in 0..n {
        let s = &samples[rng.below(samples.len())];
        // Crop origin.
        let (top, left) = if !s.foreground.is_empty() && rng.uniform() < aug.foreground_crop {
            let p = s.foreground[rng.below(s.foreground.len())] as usize;
            let (py, px) = ((p / s.width) as i64, (p % s.width) as i64);
            let jy = rng.below(h / 2 + 1) as i64 - (h / 4) as i64;
            let jx = rng.below(w / 2 + 1) as i64 - (w / 4) as i64;
            let top = (py - (h / 2) as i64 + jy).clamp(0, (s.height as i64 - h as i64).max(0));
            let left = (px - (w / 2) as i64 + jx).clamp(0, (s.width as i64 - w as i64).max(0));
            (top, left)
        } else {
            let top = rng.below(s.height.saturating_sub(h) + 1) as i64;
            let left = rng.below(s.width.saturating_sub(w) + 1) as i64;
            (top, left)
        };
        let (flip_y, flip_x, rot) = if aug.geometric {
            (
                rng.coin(),
                rng.coin(),
                if h == w { rng.below(4) } else { 0 },
            )
        } else {
            (false, false, 0)
        };
        let (gain, shift) = if aug.intensity > 0.0 {
            let a = f64::from(aug.intensity);
            (
                rng.range_f(1.0 - a, 1.0 + a) as f32,
                rng.range_f(-a, a) as f32,
            )
        } else {
            (1.0, 0.0)
        };
        let plane = s.height * s.width;
        for oy in 0..h {
            for ox in 0..w {
                // Output pixel -> crop pixel through the dihedral transform.
                let (mut y, mut x) = (oy, ox);
                for _ in 0..rot {
                    (y, x) = (x, h - 1 - y);
                }
                if flip_y {
                    y = h - 1 - y;
                }
                if flip_x {
                    x = w - 1 - x;
                }
                let sy = reflect(top + y as i64, s.height);
                let sx = reflect(left + x as i64, s.width);
                let src = sy * s.width + sx;
                for ch in 0..c {
                    xs[((b * c + ch) * h + oy) * w + ox] =
                        s.pixels[ch * plane + src] * gain + shift;
                }
                let cls = usize::from(s.mask[src]).min(classes - 1);
                ys[((b * classes + cls) * h + oy) * w + ox] = 1.0;
            }
        }
    }
    Ok(Batch {
        x: Tensor::from_vec(xs, (n, c, h, w), device)?,
        onehot: Tensor::from_vec(ys, (n, classes, h, w), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_indices() {
        let v: Vec<usize> = (-3..8).map(|i| reflect(i, 4)).collect();
        assert_eq!(v, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
        assert_eq!(reflect(5, 1), 0);
    }

    #[test]
    fn standardized_planes_have_zero_mean_unit_std() {
        let img = Image8 {
            width: 2,
            height: 2,
            channels: 1,
            data: vec![0, 100, 200, 255],
        };
        let p = standardize(&img);
        let mean: f32 = p.iter().sum::<f32>() / 4.0;
        let var: f32 = p.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    #[test]
    fn downscale_and_back() {
        let img = Image8 {
            width: 5,
            height: 4,
            channels: 1,
            data: (0..20).map(|v| v as u8 * 10).collect(),
        };
        let d = downscale_image(&img, 2);
        assert_eq!((d.width, d.height), (2, 2));
        // Block (0..2, 0..2) holds 0, 10, 50, 60: rounded mean 30.
        assert_eq!(d.data[0], 30);
        let mask = vec![1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let m = downscale_mask(&mask, 5, 4, 2);
        assert_eq!(m, vec![1, 0, 0, 0]);
        let up = upscale_labels(&m, 2, 2, 2, 5, 4);
        assert_eq!(up.len(), 20);
        assert_eq!(&up[..5], &[1, 1, 0, 0, 0]);
        assert_eq!(&up[15..], &[0, 0, 0, 0, 0]);
        assert_eq!(upscale_labels(&mask, 5, 4, 1, 5, 4), mask);
    }
}
