//! `ccnet segment`: offline field use on a PC or single-board computer. Runs a packed
//! model with the device engine (not candle: no GPU, no network) on images of any size
//! and writes masks and overlays.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::dataset::load_image;
use crate::fsutil::write_atomic;
use crate::pack::evaluate::{segment_image, LoadedModel};

/// Arguments of `ccnet segment`.
#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// Packed model (`ccnet pack`).
    #[arg(long)]
    pub model: PathBuf,
    /// Images to segment (PNG, TIFF 8/16-bit, JPEG, BMP).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder: `<stem>_mask.png` (foreground 255) and `<stem>_overlay.png`.
    #[arg(long)]
    pub out: PathBuf,
}

fn png_bytes(
    write: impl FnOnce(&mut std::io::Cursor<&mut Vec<u8>>) -> image::ImageResult<()>,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    write(&mut std::io::Cursor::new(&mut buf))?;
    Ok(buf)
}

/// Runs `ccnet segment`.
pub fn run(a: &SegmentArgs) -> Result<()> {
    let bytes =
        std::fs::read(&a.model).with_context(|| format!("{}: cannot read", a.model.display()))?;
    let loaded = LoadedModel::new(&bytes).with_context(|| format!("{}", a.model.display()))?;
    let model = loaded.model()?;
    let mut arena = Vec::new();
    for path in &a.images {
        let img = load_image(path)?;
        let t0 = Instant::now();
        let (mask, arena_bytes) = segment_image(&model, &img, &mut arena)
            .with_context(|| format!("{}", path.display()))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            bail!("{}: no file name", path.display());
        };
        let (w, h) = (img.width, img.height);
        let m = GrayImage::from_fn(w, h, |x, y| {
            Luma([if mask[(y * w + x) as usize] > 0 {
                255
            } else {
                0
            }])
        });
        let rgb = img.to_rgb();
        let overlay = RgbImage::from_fn(w, h, |x, y| {
            let i = (y * w + x) as usize;
            let p = [rgb.data[3 * i], rgb.data[3 * i + 1], rgb.data[3 * i + 2]];
            if mask[i] > 0 {
                Rgb([((u16::from(p[0]) + 255) / 2) as u8, p[1] / 2, p[2] / 2])
            } else {
                Rgb(p)
            }
        });
        let mask_path = a.out.join(format!("{stem}_mask.png"));
        let overlay_path = a.out.join(format!("{stem}_overlay.png"));
        write_atomic(
            &mask_path,
            &png_bytes(|c| m.write_to(c, image::ImageFormat::Png))?,
        )
        .with_context(|| format!("{}: cannot write", mask_path.display()))?;
        write_atomic(
            &overlay_path,
            &png_bytes(|c| overlay.write_to(c, image::ImageFormat::Png))?,
        )
        .with_context(|| format!("{}: cannot write", overlay_path.display()))?;
        let fg = mask.iter().filter(|&&v| v > 0).count();
        println!(
            "{}: {w}x{h}, foreground {:.1} %, {ms:.1} ms, arena {arena_bytes} bytes -> {}",
            path.display(),
            100.0 * fg as f64 / mask.len().max(1) as f64,
            mask_path.display()
        );
    }
    Ok(())
}
