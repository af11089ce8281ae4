//! `ccnet crops`: cut one large annotated image into a dataset of square crops
//! (`images/` + `masks/`), e.g. a single microscope field into training material.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use image::{GrayImage, Luma, RgbImage};

use crate::dataset::{load_image, load_mask};
use crate::fsutil::write_atomic;

/// Arguments of `ccnet crops`.
#[derive(Debug, Args)]
pub struct CropsArgs {
    /// The image (PNG, TIFF 8/16-bit, JPEG, BMP).
    #[arg(long)]
    pub image: PathBuf,
    /// Its mask or label image; any value above --mask-threshold is foreground.
    #[arg(long)]
    pub mask: PathBuf,
    /// Crop side in pixels.
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Mask values above this are foreground (0: every labelled instance).
    #[arg(long, default_value_t = 0)]
    pub mask_threshold: u16,
    /// Output dataset folder (gets images/ and masks/).
    #[arg(long)]
    pub out: PathBuf,
}

fn png(img: impl FnOnce(&mut Vec<u8>) -> image::ImageResult<()>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    img(&mut buf)?;
    Ok(buf)
}

/// Runs `ccnet crops`: non-overlapping crops in row-major order, named `rYY_cXX`.
pub fn run(a: &CropsArgs) -> Result<usize> {
    if a.size == 0 {
        bail!("--size must be at least 1");
    }
    let img = load_image(&a.image)?;
    let mask = load_mask(&a.mask, Some(a.mask_threshold))?;
    if (img.width, img.height) != (mask.width, mask.height) {
        bail!(
            "{}: mask is {}x{} but the image {} is {}x{}",
            a.mask.display(),
            mask.width,
            mask.height,
            a.image.display(),
            img.width,
            img.height
        );
    }
    let (rows, cols) = (img.height / a.size, img.width / a.size);
    if rows * cols == 0 {
        bail!(
            "{}: {}x{} is smaller than one {}-pixel crop",
            a.image.display(),
            img.width,
            img.height,
            a.size
        );
    }
    let c = img.channels as usize;
    let s = a.size;
    for r in 0..rows {
        for q in 0..cols {
            let (x0, y0) = (q * s, r * s);
            let at = |x: u32, y: u32| ((y0 + y) * img.width + x0 + x) as usize;
            let name = format!("r{r:02}_c{q:02}.png");
            let image_png = if c == 1 {
                let g = GrayImage::from_fn(s, s, |x, y| Luma([img.data[at(x, y)]]));
                png(|b| g.write_to(&mut std::io::Cursor::new(b), image::ImageFormat::Png))?
            } else {
                let g = RgbImage::from_fn(s, s, |x, y| {
                    let i = at(x, y) * 3;
                    image::Rgb([img.data[i], img.data[i + 1], img.data[i + 2]])
                });
                png(|b| g.write_to(&mut std::io::Cursor::new(b), image::ImageFormat::Png))?
            };
            let m = GrayImage::from_fn(s, s, |x, y| Luma([mask.data[at(x, y)] * 255]));
            let mask_png =
                png(|b| m.write_to(&mut std::io::Cursor::new(b), image::ImageFormat::Png))?;
            write_atomic(&a.out.join("images").join(&name), &image_png)
                .with_context(|| format!("{}: cannot write", a.out.display()))?;
            write_atomic(&a.out.join("masks").join(&name), &mask_png)
                .with_context(|| format!("{}: cannot write", a.out.display()))?;
        }
    }
    eprintln!(
        "wrote {} crops of {s}x{s} to {}",
        rows * cols,
        a.out.display()
    );
    Ok((rows * cols) as usize)
}
