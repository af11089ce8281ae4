//! Segmentation datasets on disk: a folder with `images/` and `masks/` whose files pair
//! up by stem (`images/a.png` ↔ `masks/a.tif`), or a bare folder of images when no masks
//! are needed. PNG, TIFF, JPEG and BMP are read.
//!
//! Rules, stated once:
//! * **Bit depth**: 8-bit images are used as they are. 16-bit images are mapped to 8 bits
//!   by a percentile stretch: the 0.5th and 99.5th percentiles of the image's values
//!   map to 0 and 255 (clamped), per image. Floating-point images are refused.
//! * **Colour**: gray (and gray + alpha) images have 1 channel, colour images 3; alpha is
//!   dropped. A dataset that mixes gray and colour images is used as 3-channel (gray
//!   replicated into R, G and B): see [`Dataset::channels`]. Complexity measures use
//!   their own rule, stated in [`crate::complexity`]: J is taken on the luma of every
//!   image so that gray and colour images stay comparable.
//! * **Masks**: 8- or 16-bit single-channel (colour masks are converted to gray); by
//!   default only the values 0 (background) and 255 (foreground) are accepted, anything
//!   else is an error naming the file, unless a threshold is given (`value > threshold`
//!   is foreground). A mask must have its image's width and height.
//!
//! Datasets are listed up front (paths only) and read one image at a time, so memory
//! does not grow with the number of images.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use image::{ColorType, DynamicImage, ImageReader};

/// File extensions read as images (lower case).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "tif", "tiff", "jpg", "jpeg", "bmp"];

/// Why a dataset or one of its files could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The dataset folder does not exist.
    #[error("{path}: dataset folder not found")]
    NotFound {
        /// The folder.
        path: PathBuf,
    },
    /// A folder could not be listed.
    #[error("{path}: cannot list folder: {source}")]
    List {
        /// The folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No image files were found.
    #[error("{path}: no images found (expected {} files)", IMAGE_EXTENSIONS.join(", "))]
    NoImages {
        /// The folder searched.
        path: PathBuf,
    },
    /// Masks are required but the folder has no `masks/`.
    #[error(
        "{path}: no masks/ folder (a dataset needs images/ and masks/ with the same file stems)"
    )]
    NoMaskFolder {
        /// The dataset folder.
        path: PathBuf,
    },
    /// Two files in one folder share a stem.
    #[error("{first} and {second}: two files with the same name stem")]
    DuplicateStem {
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// An image has no mask.
    #[error("{image}: no mask with the same stem in masks/")]
    MissingMask {
        /// The image.
        image: PathBuf,
    },
    /// A mask has no image.
    #[error("{mask}: mask without an image of the same stem in images/")]
    ExtraMask {
        /// The mask.
        mask: PathBuf,
    },
    /// A file could not be decoded.
    #[error("{path}: cannot read image: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Decoder message.
        message: String,
    },
    /// An image type that is not supported (e.g. floating point).
    #[error("{path}: unsupported pixel format {format}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The format found.
        format: String,
    },
    /// Image and mask sizes differ.
    #[error("{mask}: mask is {mask_w}x{mask_h} but its image {image} is {image_w}x{image_h}")]
    SizeMismatch {
        /// The image.
        image: PathBuf,
        /// The mask.
        mask: PathBuf,
        /// Image width.
        image_w: u32,
        /// Image height.
        image_h: u32,
        /// Mask width.
        mask_w: u32,
        /// Mask height.
        mask_h: u32,
    },
    /// A mask holds values other than 0 and 255.
    #[error("{path}: mask is not binary (found value {value}; expected only 0 and 255, or pass a mask threshold)")]
    NonBinaryMask {
        /// The mask.
        path: PathBuf,
        /// The first offending value.
        value: u16,
    },
}

/// One image and (optionally) its mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The shared file stem.
    pub id: String,
    /// Image file.
    pub image: PathBuf,
    /// Mask file, if the dataset has masks.
    pub mask: Option<PathBuf>,
}

/// A dataset listing: paths only, read lazily.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Folder name.
    pub name: String,
    /// Folder.
    pub dir: PathBuf,
    /// Items sorted by id.
    pub items: Vec<Item>,
}

/// An 8-bit image, row-major, channels interleaved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// 1 (gray) or 3 (RGB).
    pub channels: u32,
    /// `height · width · channels` bytes.
    pub data: Vec<u8>,
}

impl Image8 {
    /// The same image with 3 channels (gray replicated); RGB images are returned as is.
    pub fn to_rgb(&self) -> Image8 {
        if self.channels == 3 {
            return self.clone();
        }
        Image8 {
            width: self.width,
            height: self.height,
            channels: 3,
            data: self.data.iter().flat_map(|&v| [v, v, v]).collect(),
        }
    }

    /// Luma (ITU-R BT.601, rounded) for RGB images; gray images are returned as is.
    pub fn to_gray(&self) -> Image8 {
        if self.channels == 1 {
            return self.clone();
        }
        let data = self
            .data
            .chunks_exact(3)
            .map(|p| {
                let y = 299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]);
                ((y + 500) / 1000) as u8
            })
            .collect();
        Image8 {
            width: self.width,
            height: self.height,
            channels: 1,
            data,
        }
    }
}

/// A binary mask: 0 background, 1 foreground, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// `height · width` values in {0, 1}.
    pub data: Vec<u8>,
}

fn list_images(dir: &Path) -> Result<BTreeMap<String, PathBuf>, DatasetError> {
    let entries = fs::read_dir(dir).map_err(|source| DatasetError::List {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| DatasetError::List {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if !path.is_file() || !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(prev) = out.insert(stem, path.clone()) {
            return Err(DatasetError::DuplicateStem {
                first: prev,
                second: path,
            });
        }
    }
    Ok(out)
}

impl Dataset {
    /// Lists a dataset. With `require_masks`, the folder must hold `images/` and `masks/`
    /// that pair up exactly; without it, `images/` (or the folder itself when it has no
    /// `images/`) is listed and masks are attached where present.
    pub fn open(dir: &Path, require_masks: bool) -> Result<Dataset, DatasetError> {
        if !dir.is_dir() {
            return Err(DatasetError::NotFound {
                path: dir.to_path_buf(),
            });
        }
        let images_dir = dir.join("images");
        let masks_dir = dir.join("masks");
        let has_images_dir = images_dir.is_dir();
        let image_root = if has_images_dir { &images_dir } else { dir };
        let images = list_images(image_root)?;
        if images.is_empty() {
            return Err(DatasetError::NoImages {
                path: image_root.to_path_buf(),
            });
        }
        let masks = if has_images_dir && masks_dir.is_dir() {
            Some(list_images(&masks_dir)?)
        } else {
            None
        };
        if require_masks && masks.is_none() {
            return Err(DatasetError::NoMaskFolder {
                path: dir.to_path_buf(),
            });
        }
        let mut items = Vec::with_capacity(images.len());
        for (id, image) in &images {
            let mask = match &masks {
                Some(m) => match m.get(id) {
                    Some(p) => Some(p.clone()),
                    None if require_masks => {
                        return Err(DatasetError::MissingMask {
                            image: image.clone(),
                        })
                    }
                    None => None,
                },
                None => None,
            };
            items.push(Item {
                id: id.clone(),
                image: image.clone(),
                mask,
            });
        }
        if let Some(m) = &masks {
            if let Some((_, extra)) = m.iter().find(|(id, _)| !images.contains_key(*id)) {
                return Err(DatasetError::ExtraMask {
                    mask: extra.clone(),
                });
            }
        }
        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".to_string());
        Ok(Dataset {
            name,
            dir: dir.to_path_buf(),
            items,
        })
    }

    /// Channels the network input should have: 1 if every image is gray, else 3.
    /// Reads only the file headers.
    pub fn channels(&self) -> Result<u32, DatasetError> {
        for item in &self.items {
            let (_, _, color) = probe(&item.image)?;
            if color.has_color() {
                return Ok(3);
            }
        }
        Ok(1)
    }
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Unreadable {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Width, height and colour type from the file header, without decoding pixels.
pub fn probe(path: &Path) -> Result<(u32, u32, ColorType), DatasetError> {
    let decoder = ImageReader::open(path)
        .map_err(|e| unreadable(path, e))?
        .with_guessed_format()
        .map_err(|e| unreadable(path, e))?
        .into_decoder()
        .map_err(|e| unreadable(path, e))?;
    use image::ImageDecoder;
    let (w, h) = decoder.dimensions();
    Ok((w, h, decoder.color_type()))
}

fn decode(path: &Path) -> Result<DynamicImage, DatasetError> {
    ImageReader::open(path)
        .map_err(|e| unreadable(path, e))?
        .with_guessed_format()
        .map_err(|e| unreadable(path, e))?
        .decode()
        .map_err(|e| unreadable(path, e))
}

/// Maps 16-bit values to 8 bits: the 0.5th and 99.5th percentiles become 0 and 255.
pub fn stretch_16_to_8(values: &[u16]) -> Vec<u8> {
    if values.is_empty() {
        return Vec::new();
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let pick = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (f64::from(pick(0.005)), f64::from(pick(0.995)));
    let span = (hi - lo).max(1.0);
    values
        .iter()
        .map(|&v| {
            ((f64::from(v) - lo) / span * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Reads an image as 8-bit gray or RGB by the rules in the module documentation.
pub fn load_image(path: &Path) -> Result<Image8, DatasetError> {
    let img = decode(path)?;
    let (width, height) = (img.width(), img.height());
    let (channels, data) = match img {
        DynamicImage::ImageLuma8(b) => (1, b.into_raw()),
        DynamicImage::ImageLumaA8(_) => (1, img.to_luma8().into_raw()),
        DynamicImage::ImageRgb8(b) => (3, b.into_raw()),
        DynamicImage::ImageRgba8(_) => (3, img.to_rgb8().into_raw()),
        DynamicImage::ImageLuma16(b) => (1, stretch_16_to_8(b.as_raw())),
        DynamicImage::ImageLumaA16(_) => (1, stretch_16_to_8(img.to_luma16().as_raw())),
        DynamicImage::ImageRgb16(b) => (3, stretch_16_to_8(b.as_raw())),
        DynamicImage::ImageRgba16(_) => (3, stretch_16_to_8(img.to_rgb16().as_raw())),
        other => {
            return Err(DatasetError::Unsupported {
                path: path.to_path_buf(),
                format: format!("{:?}", other.color()),
            })
        }
    };
    Ok(Image8 {
        width,
        height,
        channels,
        data,
    })
}

/// Reads a mask: only 0 and 255 unless `threshold` is given (`value > threshold` is
/// foreground; for 16-bit masks the threshold applies to the 16-bit value).
pub fn load_mask(path: &Path, threshold: Option<u16>) -> Result<Mask, DatasetError> {
    let img = decode(path)?;
    let (width, height) = (img.width(), img.height());
    let values: Vec<u16> = match &img {
        DynamicImage::ImageLuma16(b) => b.as_raw().clone(),
        DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => img.to_luma16().into_raw(),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| u16::from(v)).collect(),
        _ => img
            .to_luma8()
            .into_raw()
            .iter()
            .map(|&v| u16::from(v))
            .collect(),
    };
    let data = match threshold {
        Some(t) => values.iter().map(|&v| u8::from(v > t)).collect(),
        None => {
            let mut out = Vec::with_capacity(values.len());
            for &v in &values {
                match v {
                    0 => out.push(0),
                    255 => out.push(1),
                    other => {
                        return Err(DatasetError::NonBinaryMask {
                            path: path.to_path_buf(),
                            value: other,
                        })
                    }
                }
            }
            out
        }
    };
    Ok(Mask {
        width,
        height,
        data,
    })
}

/// Reads an item's image and mask and checks that their sizes agree.
pub fn load_pair(item: &Item, threshold: Option<u16>) -> Result<(Image8, Mask), DatasetError> {
    let image = load_image(&item.image)?;
    let mask_path = item
        .mask
        .as_ref()
        .ok_or_else(|| DatasetError::MissingMask {
            image: item.image.clone(),
        })?;
    let mask = load_mask(mask_path, threshold)?;
    if (image.width, image.height) != (mask.width, mask.height) {
        return Err(DatasetError::SizeMismatch {
            image: item.image.clone(),
            mask: mask_path.clone(),
            image_w: image.width,
            image_h: image.height,
            mask_w: mask.width,
            mask_h: mask.height,
        });
    }
    Ok((image, mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, RgbImage};

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ccnet-ds-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("images")).unwrap();
        fs::create_dir_all(d.join("masks")).unwrap();
        d
    }

    #[test]
    fn pairs_by_stem_and_reads_pixels() {
        let d = tempdir("pairs");
        GrayImage::from_fn(4, 3, |x, _| Luma([x as u8 * 10]))
            .save(d.join("images/a.png"))
            .unwrap();
        RgbImage::from_pixel(4, 3, image::Rgb([1, 2, 3]))
            .save(d.join("images/b.bmp"))
            .unwrap();
        for id in ["a", "b"] {
            GrayImage::from_fn(4, 3, |x, _| Luma([if x > 1 { 255 } else { 0 }]))
                .save(d.join(format!("masks/{id}.png")))
                .unwrap();
        }
        let ds = Dataset::open(&d, true).unwrap();
        assert_eq!(ds.items.len(), 2);
        assert_eq!(ds.channels().unwrap(), 3);
        let (img, mask) = load_pair(&ds.items[0], None).unwrap();
        assert_eq!((img.channels, img.data[3]), (1, 30));
        assert_eq!(mask.data[..4], [0, 0, 1, 1]);
        let (rgb, _) = load_pair(&ds.items[1], None).unwrap();
        assert_eq!(&rgb.data[..3], &[1, 2, 3]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_datasets_name_the_file() {
        let d = tempdir("bad");
        GrayImage::new(4, 4).save(d.join("images/a.png")).unwrap();
        let e = Dataset::open(&d, true).unwrap_err();
        assert!(e.to_string().contains("a.png"), "{e}");
        GrayImage::from_pixel(4, 4, Luma([7]))
            .save(d.join("masks/a.png"))
            .unwrap();
        let ds = Dataset::open(&d, true).unwrap();
        let e = load_pair(&ds.items[0], None).unwrap_err();
        assert!(
            matches!(e, DatasetError::NonBinaryMask { value: 7, .. }),
            "{e}"
        );
        assert_eq!(
            load_pair(&ds.items[0], Some(5)).unwrap().1.data,
            vec![1; 16]
        );
        GrayImage::new(5, 4).save(d.join("masks/a.png")).unwrap();
        let e = load_pair(&ds.items[0], None).unwrap_err();
        assert!(matches!(e, DatasetError::SizeMismatch { .. }), "{e}");
        GrayImage::new(4, 4).save(d.join("masks/z.png")).unwrap();
        let e = Dataset::open(&d, true).unwrap_err();
        assert!(e.to_string().contains("z.png"), "{e}");
        fs::write(d.join("images/a.png"), b"not a png").unwrap();
        fs::remove_file(d.join("masks/z.png")).unwrap();
        let ds = Dataset::open(&d, true).unwrap();
        let e = load_pair(&ds.items[0], None).unwrap_err();
        assert!(matches!(e, DatasetError::Unreadable { .. }) && e.to_string().contains("a.png"));
        fs::remove_dir_all(&d).unwrap();
        assert!(matches!(
            Dataset::open(&d, true).unwrap_err(),
            DatasetError::NotFound { .. }
        ));
    }

    #[test]
    fn sixteen_bit_images_are_stretched() {
        let d = tempdir("sixteen");
        let img: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(10, 10, |x, y| Luma([1000 + (x + 10 * y) as u16 * 100]));
        img.save(d.join("images/a.tif")).unwrap();
        let out = load_image(&d.join("images/a.tif")).unwrap();
        assert_eq!(out.channels, 1);
        assert_eq!(out.data[0], 0);
        assert_eq!(out.data[99], 255);
        assert!(out.data[50] > 100 && out.data[50] < 155);
        fs::remove_dir_all(&d).unwrap();
    }
}
