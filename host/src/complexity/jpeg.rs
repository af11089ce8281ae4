//! J, JPEG complexity: the size of the image's baseline JPEG encoding at a fixed quality
//! divided by its raw size (`width · height · channels` bytes), the compression-ratio
//! complexity of Yu & Winkler (QoMEX 2013).
//!
//! The encoder is the `image` crate's baseline encoder: IJG quantisation tables scaled
//! by the quality, standard Huffman tables, no chroma subsampling (4:4:4), and the
//! whole file counted (headers included, about 0.6 KB).

use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;

use crate::dataset::Image8;

/// JPEG bytes / raw bytes of an 8-bit gray or RGB image at `quality` (1–100).
pub fn jpeg_ratio(img: &Image8, quality: u8) -> Result<f64, String> {
    let color = match img.channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        c => return Err(format!("JPEG complexity needs 1 or 3 channels, not {c}")),
    };
    if img.width > 65_535 || img.height > 65_535 {
        return Err(format!(
            "image is {}x{}, larger than JPEG allows (65535)",
            img.width, img.height
        ));
    }
    let raw = img.data.len();
    if raw == 0 {
        return Err("empty image".to_string());
    }
    let mut out = Vec::with_capacity(raw / 4);
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode(&img.data, img.width, img.height, color)
        .map_err(|e| format!("JPEG encoding failed: {e}"))?;
    Ok(out.len() as f64 / raw as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32, mut f: impl FnMut(u32, u32) -> u8) -> Image8 {
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| f(x, y))
            .collect();
        Image8 {
            width: w,
            height: h,
            channels: 1,
            data,
        }
    }

    #[test]
    fn noise_costs_more_than_a_gradient_and_a_flat_image_least() {
        let mut state = 12345u32;
        let noise = gray(128, 128, |_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        });
        let flat = gray(128, 128, |_, _| 120);
        let ramp = gray(128, 128, |x, y| ((x + y) as f32 / 254.0 * 255.0) as u8);
        let (jn, jf, jr) = (
            jpeg_ratio(&noise, 75).unwrap(),
            jpeg_ratio(&flat, 75).unwrap(),
            jpeg_ratio(&ramp, 75).unwrap(),
        );
        assert!(jf < jr && jr < jn, "flat {jf} ramp {jr} noise {jn}");
        assert!(jf < 0.06 && jn > 0.5, "flat {jf} noise {jn}");
        // Higher quality keeps more of the noise.
        assert!(jpeg_ratio(&noise, 95).unwrap() > jn);
    }

    #[test]
    fn rgb_counts_three_bytes_per_pixel() {
        let g = gray(64, 64, |x, y| ((x * 7 + y * 13) % 256) as u8);
        let (jg, jc) = (
            jpeg_ratio(&g, 75).unwrap(),
            jpeg_ratio(&g.to_rgb(), 75).unwrap(),
        );
        // Gray replicated into RGB adds (almost) nothing to encode but triples the raw size.
        assert!(jc < jg && jc > jg / 4.0, "gray {jg} rgb {jc}");
        let bad = Image8 {
            width: 2,
            height: 2,
            channels: 2,
            data: vec![0; 8],
        };
        assert!(jpeg_ratio(&bad, 75).is_err());
    }
}
