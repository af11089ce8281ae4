//! Scale-space detectors: B (Laplacian-of-Gaussian blob density) and the Hessian
//! key points (determinant of Hessian, the detector behind SURF), computed from the same
//! Gaussian derivatives.
//!
//! For each scale σ in a log-spaced list the image (gray, in [0, 1]) is convolved with
//! the Gaussian second derivatives, giving `Lxx`, `Lyy` and `Lxy`. Then
//!
//! * the scale-normalised LoG is `−σ²(Lxx + Lyy)`: a bright blob of contrast `A` and size
//!   σ₀ answers `A/2` at σ = σ₀. A **blob** is a local maximum over the 3×3×3
//!   neighbourhood in (scale, y, x) above the LoG threshold, of the LoG (bright blobs)
//!   and of its negative (dark blobs); overlapping blobs of one polarity are pruned as
//!   scikit-image's `blob_log` does (radius `√2·σ`, the smaller of two blobs whose
//!   intersection covers more than `overlap` of the smaller disk is dropped).
//! * the scale-normalised determinant of Hessian is `σ⁴(Lxx·Lyy − Lxy²)`: the same
//!   blob answers `A²/16`, so its threshold is set to match the LoG threshold
//!   (`t_doh = t_log² / 4`). A **key point** is a local 3×3×3 maximum above it.
//!
//! Only three scales are held at a time, so memory is a small multiple of the image.

use serde::{Deserialize, Serialize};

use super::filters::{
    convolve_cols3_strips, convolve_row, gaussian_kernel, ColumnStrips, PaddedRows, Plane,
};

/// Which blobs count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polarity {
    /// Bright blobs on a darker surround only (scikit-image's `blob_log`).
    Bright,
    /// Dark blobs on a brighter surround only.
    Dark,
    /// Both (the default: stained nuclei are dark, fluorescent ones bright).
    Both,
}

/// Parameters of the scale-space detectors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlobSettings {
    /// Smallest scale σ in pixels.
    pub sigma_min: f64,
    /// Largest scale σ in pixels.
    pub sigma_max: f64,
    /// Number of scales, log-spaced from `sigma_min` to `sigma_max`.
    pub num_sigma: usize,
    /// Threshold on the scale-normalised LoG (image in [0, 1]).
    pub log_threshold: f64,
    /// Threshold on the scale-normalised determinant of Hessian.
    pub doh_threshold: f64,
    /// Largest allowed overlap fraction of two blobs before the smaller is dropped.
    pub overlap: f64,
    /// Gaussian kernel radius in standard deviations.
    pub truncate: f64,
    /// Which blob polarity counts for B.
    pub polarity: Polarity,
}

impl Default for BlobSettings {
    fn default() -> Self {
        BlobSettings {
            sigma_min: 2.0,
            sigma_max: 16.0,
            num_sigma: 7,
            log_threshold: 0.1,
            // (log_threshold)² / 4: the same blob contrast as the LoG threshold.
            doh_threshold: 0.0025,
            overlap: 0.5,
            truncate: 4.0,
            polarity: Polarity::Both,
        }
    }
}

impl BlobSettings {
    /// The scales: `num_sigma` values log-spaced from `sigma_min` to `sigma_max`.
    pub fn sigmas(&self) -> Vec<f64> {
        let n = self.num_sigma.max(1);
        if n == 1 {
            return vec![self.sigma_min];
        }
        let (a, b) = (self.sigma_min.ln(), self.sigma_max.ln());
        (0..n)
            .map(|i| (a + (b - a) * i as f64 / (n - 1) as f64).exp())
            .collect()
    }

    /// Area in pixels of the cell that one smallest blob occupies, `(2·√2·σ_min)²`:
    /// counts are divided by `image area / cell`, so densities are dimensionless and
    /// about 1 when the image is packed with the smallest blobs.
    pub fn cell_area(&self) -> f64 {
        8.0 * self.sigma_min * self.sigma_min
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.sigma_min > 0.0 && self.sigma_max >= self.sigma_min) {
            return Err(format!(
                "blob scales must satisfy 0 < sigma_min <= sigma_max (got {} and {})",
                self.sigma_min, self.sigma_max
            ));
        }
        if self.num_sigma == 0 || self.num_sigma > 64 {
            return Err(format!("num_sigma must be 1..=64 (got {})", self.num_sigma));
        }
        if !(0.0..=1.0).contains(&self.overlap) {
            return Err(format!("overlap must be in [0, 1] (got {})", self.overlap));
        }
        if !(self.log_threshold > 0.0 && self.doh_threshold > 0.0 && self.truncate >= 1.0) {
            return Err("blob thresholds must be > 0 and truncate >= 1".to_string());
        }
        Ok(())
    }
}

/// A detected blob or key point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Blob {
    /// Column.
    pub x: f32,
    /// Row.
    pub y: f32,
    /// Scale σ at which it answered most.
    pub sigma: f32,
    /// Bright (true) or dark blob.
    pub bright: bool,
}

/// What the scale-space pass found in one image.
#[derive(Clone, Debug, Default)]
pub struct Detections {
    /// LoG blobs after pruning (of the polarities asked for).
    pub blobs: Vec<Blob>,
    /// Determinant-of-Hessian key points.
    pub keypoints: Vec<Blob>,
}

struct Scale {
    sigma: f64,
    log: Plane,
    doh: Plane,
}

impl Scale {
    fn empty() -> Scale {
        Scale {
            sigma: 0.0,
            log: Plane::filled(0, 0, 0.0),
            doh: Plane::filled(0, 0, 0.0),
        }
    }
}

/// Buffers reused across the scales of one image: the three column-filtered planes and
/// one row each of `Lxx`, `Lyy`, `Lxy`.
struct Workspace {
    cols: [PaddedRows; 3],
    lxx: Vec<f32>,
    lyy: Vec<f32>,
    lxy: Vec<f32>,
}

impl Workspace {
    fn new() -> Workspace {
        Workspace {
            cols: std::array::from_fn(|_| PaddedRows::new(0, 0, 0)),
            lxx: Vec::new(),
            lyy: Vec::new(),
            lxy: Vec::new(),
        }
    }
}

/// The scale-normalised LoG and determinant of Hessian at `sigma`, written into `out`
/// (its buffers are reused). One fused column pass gives the image filtered along y
/// with the Gaussian's orders 0, 1, 2; then each row is filtered along x and combined
/// at once, so `Lxx`, `Lyy`, `Lxy` never exist as whole planes.
fn scale_responses(
    img: &ColumnStrips,
    (w, h): (usize, usize),
    sigma: f64,
    truncate: f64,
    ws: &mut Workspace,
    out: &mut Scale,
) {
    let g0 = gaussian_kernel(sigma, 0, truncate);
    let g1 = gaussian_kernel(sigma, 1, truncate);
    let g2 = gaussian_kernel(sigma, 2, truncate);
    convolve_cols3_strips(img, [&g0, &g1, &g2], g0.radius(), &mut ws.cols);
    let s2 = (sigma * sigma) as f32;
    let s4 = s2 * s2;
    out.sigma = sigma;
    for p in [&mut out.log, &mut out.doh] {
        p.width = w;
        p.height = h;
        p.data.resize(w * h, 0.0);
    }
    for buf in [&mut ws.lxx, &mut ws.lyy, &mut ws.lxy] {
        buf.resize(w, 0.0);
    }
    let [c0, c1, c2] = &ws.cols;
    for y in 0..h {
        let row = y * w..(y + 1) * w;
        convolve_row(c0, y, &g2, &mut ws.lxx);
        convolve_row(c2, y, &g0, &mut ws.lyy);
        convolve_row(c1, y, &g1, &mut ws.lxy);
        let it = out.log.data[row.clone()]
            .iter_mut()
            .zip(&mut out.doh.data[row])
            .zip(ws.lxx.iter().zip(&ws.lyy).zip(&ws.lxy));
        for ((log, doh), ((&a, &b), &c)) in it {
            *log = -s2 * (a + b);
            *doh = s4 * (a * b - c * c);
        }
    }
}

/// Local maxima of `±cur` over the 3×3×3 neighbourhood formed with the scales below
/// and above (absent at the ends of the scale range): with `bright`, maxima of `cur`
/// above `threshold`; with `dark`, maxima of `−cur` above it (a value cannot be both).
/// Plateaus give one maximum: a point must be strictly above the neighbours that come
/// before it in (scale, row, column) order and at least equal to the others. Found
/// points are appended as `(x, y, is_bright)` in raster order.
fn local_maxima(
    below: Option<&Plane>,
    cur: &Plane,
    above: Option<&Plane>,
    (bright, dark): (bool, bool),
    threshold: f32,
    out: &mut Vec<(usize, usize, bool)>,
) {
    let (w, h) = (cur.width, cur.height);
    let hi = if bright { threshold } else { f32::INFINITY };
    let lo = if dark { -threshold } else { f32::NEG_INFINITY };
    const CHUNK: usize = 16;
    for y in 0..h {
        let row = &cur.data[y * w..(y + 1) * w];
        for (ci, chunk) in row.chunks(CHUNK).enumerate() {
            // Most pixels are below the threshold: skip whole chunks cheaply (a
            // branch-free count that vectorises).
            let candidates: u32 = chunk.iter().map(|&v| u32::from((v > hi) | (v < lo))).sum();
            if candidates == 0 {
                continue;
            }
            for (i, &raw) in chunk.iter().enumerate() {
                let x = ci * CHUNK + i;
                let sign = if raw > hi {
                    1.0
                } else if raw < lo {
                    -1.0
                } else {
                    continue;
                };
                if is_local_max(below, cur, above, x, y, sign) {
                    out.push((x, y, sign > 0.0));
                }
            }
        }
    }
}

/// Whether `sign · cur` at (x, y) is a maximum of its 3×3×3 neighbourhood (see
/// [`local_maxima`] for the plateau rule).
fn is_local_max(
    below: Option<&Plane>,
    cur: &Plane,
    above: Option<&Plane>,
    x: usize,
    y: usize,
    sign: f32,
) -> bool {
    let (w, h) = (cur.width, cur.height);
    let v = sign * cur.data[y * w + x];
    if x >= 1 && y >= 1 && x + 1 < w && y + 1 < h {
        // Interior: all 26 neighbours exist.
        let c = y * w + x;
        let idx = [
            c - w - 1,
            c - w,
            c - w + 1,
            c - 1,
            c,
            c + 1,
            c + w - 1,
            c + w,
            c + w + 1,
        ];
        // Same-scale neighbours before (row above, left) must be strictly below.
        for (k, &i) in idx.iter().enumerate() {
            if k == 4 {
                continue;
            }
            let n = sign * cur.data[i];
            if n > v || (k < 4 && n >= v) {
                return false;
            }
        }
        if let Some(b) = below {
            if idx.iter().any(|&i| sign * b.data[i] >= v) {
                return false;
            }
        }
        if let Some(a) = above {
            if idx.iter().any(|&i| sign * a.data[i] > v) {
                return false;
            }
        }
        return true;
    }
    for dy in -1isize..=1 {
        let yy = y as isize + dy;
        if yy < 0 || yy >= h as isize {
            continue;
        }
        for dx in -1isize..=1 {
            let xx = x as isize + dx;
            if xx < 0 || xx >= w as isize {
                continue;
            }
            let i = yy as usize * w + xx as usize;
            if let Some(b) = below {
                if sign * b.data[i] >= v {
                    return false;
                }
            }
            if let Some(a) = above {
                if sign * a.data[i] > v {
                    return false;
                }
            }
            if dx == 0 && dy == 0 {
                continue;
            }
            let n = sign * cur.data[i];
            let before = dy < 0 || (dy == 0 && dx < 0);
            if n > v || (before && n >= v) {
                return false;
            }
        }
    }
    true
}

/// Fraction of the smaller disk covered by the intersection of two disks.
pub fn disk_overlap(d: f64, r1: f64, r2: f64) -> f64 {
    if r1 <= 0.0 || r2 <= 0.0 || d >= r1 + r2 {
        return 0.0;
    }
    let rmin = r1.min(r2);
    if d <= (r1 - r2).abs() {
        return 1.0;
    }
    let c1 = ((d * d + r1 * r1 - r2 * r2) / (2.0 * d * r1)).clamp(-1.0, 1.0);
    let c2 = ((d * d + r2 * r2 - r1 * r1) / (2.0 * d * r2)).clamp(-1.0, 1.0);
    let a = r1 * r1 * c1.acos() + r2 * r2 * c2.acos()
        - 0.5
            * ((-d + r2 + r1) * (d + r2 - r1) * (d - r2 + r1) * (d + r2 + r1))
                .abs()
                .sqrt();
    a / (std::f64::consts::PI * rmin * rmin)
}

/// Drops the smaller of every pair of blobs that overlap by more than `overlap`
/// (blobs of different polarity never prune each other).
pub fn prune(blobs: &mut Vec<Blob>, overlap: f64) {
    if blobs.len() < 2 {
        return;
    }
    let rmax = blobs.iter().map(|b| b.sigma).fold(0.0f32, f32::max) as f64 * 2f64.sqrt();
    let cell = (2.0 * rmax).max(1.0);
    let key = |b: &Blob| ((b.x as f64 / cell) as i64, (b.y as f64 / cell) as i64);
    let mut grid: std::collections::HashMap<(i64, i64), Vec<usize>> =
        std::collections::HashMap::new();
    for (i, b) in blobs.iter().enumerate() {
        grid.entry(key(b)).or_default().push(i);
    }
    let mut alive = vec![true; blobs.len()];
    for i in 0..blobs.len() {
        let (cx, cy) = key(&blobs[i]);
        let mut neighbours: Vec<usize> = Vec::new();
        for gy in cy - 1..=cy + 1 {
            for gx in cx - 1..=cx + 1 {
                if let Some(v) = grid.get(&(gx, gy)) {
                    neighbours.extend(v.iter().copied().filter(|&j| j > i));
                }
            }
        }
        neighbours.sort_unstable();
        for j in neighbours {
            if !alive[i] {
                break;
            }
            if !alive[j] || blobs[i].bright != blobs[j].bright {
                continue;
            }
            let (a, b) = (blobs[i], blobs[j]);
            let d = f64::from((a.x - b.x).hypot(a.y - b.y));
            let (ra, rb) = (
                f64::from(a.sigma) * 2f64.sqrt(),
                f64::from(b.sigma) * 2f64.sqrt(),
            );
            if disk_overlap(d, ra, rb) > overlap {
                if a.sigma > b.sigma {
                    alive[j] = false;
                } else {
                    alive[i] = false;
                }
            }
        }
    }
    let mut k = 0;
    blobs.retain(|_| {
        k += 1;
        alive[k - 1]
    });
}

/// Runs both detectors on a gray image in [0, 1].
pub fn detect(img: &Plane, s: &BlobSettings) -> Detections {
    let sigmas = s.sigmas();
    let max_radius = sigmas
        .iter()
        .map(|&sigma| gaussian_kernel(sigma, 0, s.truncate).radius())
        .max()
        .unwrap_or(0);
    let strips = ColumnStrips::new(img, max_radius);
    let size = (img.width, img.height);
    let mut ws = Workspace::new();
    let mut window: Vec<Scale> = Vec::with_capacity(3);
    let mut spare = Scale::empty();
    let mut bright = Vec::new();
    let mut dark = Vec::new();
    let mut keypoints = Vec::new();
    let mut found = Vec::new();
    let polarities = match s.polarity {
        Polarity::Bright => (true, false),
        Polarity::Dark => (false, true),
        Polarity::Both => (true, true),
    };
    // Scale k is examined once scale k + 1 exists (or k is the last). Bright and dark
    // blobs come from one pass over the LoG (the dark response is its negative).
    let mut examine = |window: &[Scale], k: usize| {
        let cur = &window[k];
        let below = k.checked_sub(1).map(|i| &window[i]);
        let above = window.get(k + 1);
        let sigma = cur.sigma as f32;
        found.clear();
        local_maxima(
            below.map(|b| &b.log),
            &cur.log,
            above.map(|a| &a.log),
            polarities,
            s.log_threshold as f32,
            &mut found,
        );
        for &(x, y, is_bright) in &found {
            let list = if is_bright { &mut bright } else { &mut dark };
            list.push(Blob {
                x: x as f32,
                y: y as f32,
                sigma,
                bright: is_bright,
            });
        }
        found.clear();
        local_maxima(
            below.map(|b| &b.doh),
            &cur.doh,
            above.map(|a| &a.doh),
            (true, false),
            s.doh_threshold as f32,
            &mut found,
        );
        keypoints.extend(found.iter().map(|&(x, y, _)| Blob {
            x: x as f32,
            y: y as f32,
            sigma,
            bright: true,
        }));
    };
    for (i, &sigma) in sigmas.iter().enumerate() {
        let mut next = if window.len() == 3 {
            window.remove(0)
        } else {
            std::mem::replace(&mut spare, Scale::empty())
        };
        scale_responses(&strips, size, sigma, s.truncate, &mut ws, &mut next);
        window.push(next);
        if i >= 1 {
            let k = window.len() - 2;
            examine(&window, k);
        }
    }
    let k = window.len() - 1;
    examine(&window, k);
    prune(&mut bright, s.overlap);
    prune(&mut dark, s.overlap);
    bright.append(&mut dark);
    Detections {
        blobs: bright,
        keypoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spots` Gaussian spots of size `sigma0` and contrast `amp` on a flat background.
    pub(crate) fn spots(
        w: usize,
        h: usize,
        centres: &[(f32, f32)],
        sigma0: f32,
        amp: f32,
    ) -> Plane {
        let mut p = Plane::filled(w, h, 0.15);
        for y in 0..h {
            for x in 0..w {
                let mut v = 0.0;
                for &(cx, cy) in centres {
                    let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                    v += amp * (-d2 / (2.0 * sigma0 * sigma0)).exp();
                }
                p.data[y * w + x] += v;
            }
        }
        p
    }

    /// The 3×3×3 maximum rule written out plainly (the general path of `is_local_max`).
    fn reference_max(planes: [Option<&Plane>; 3], x: usize, y: usize, sign: f32) -> bool {
        let cur = planes[1].unwrap();
        let (w, h) = (cur.width as isize, cur.height as isize);
        let v = sign * cur.at(x, y);
        for (s, p) in planes.iter().enumerate() {
            let Some(p) = p else { continue };
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (xx, yy) = (x as isize + dx, y as isize + dy);
                    if xx < 0 || yy < 0 || xx >= w || yy >= h || (s == 1 && dx == 0 && dy == 0) {
                        continue;
                    }
                    let n = sign * p.at(xx as usize, yy as usize);
                    let before = s == 0 || (s == 1 && (dy < 0 || (dy == 0 && dx < 0)));
                    if n > v || (before && n >= v) {
                        return false;
                    }
                }
            }
        }
        true
    }

    #[test]
    fn maxima_follow_the_plateau_rule_inside_and_on_the_border() {
        // Coarsely quantised noise: many ties, so the plateau rule matters.
        let mut s = 11u32;
        let mut plane = |w: usize, h: usize| Plane {
            width: w,
            height: h,
            data: (0..w * h)
                .map(|_| {
                    s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((s >> 28) as f32 - 7.5) / 4.0
                })
                .collect(),
        };
        let (w, h) = (13, 9);
        let (a, b, c) = (plane(w, h), plane(w, h), plane(w, h));
        for (below, above) in [(None, Some(&c)), (Some(&a), Some(&c)), (Some(&a), None)] {
            let mut found = Vec::new();
            local_maxima(below, &b, above, (true, true), 0.3, &mut found);
            let mut want = Vec::new();
            for y in 0..h {
                for x in 0..w {
                    let v = b.at(x, y);
                    for (sign, bright) in [(1.0, true), (-1.0, false)] {
                        if sign * v > 0.3 && reference_max([below, Some(&b), above], x, y, sign) {
                            want.push((x, y, bright));
                        }
                    }
                }
            }
            assert_eq!(found, want);
            assert!(!want.is_empty());
        }
    }

    #[test]
    fn scales_are_log_spaced() {
        let s = BlobSettings::default().sigmas();
        assert_eq!(s.len(), 7);
        assert!((s[0] - 2.0).abs() < 1e-12 && (s[6] - 16.0).abs() < 1e-9);
        assert!((s[2] - 4.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn one_spot_is_found_at_its_scale() {
        let p = spots(96, 96, &[(40.0, 50.0)], 4.0, 0.7);
        let d = detect(&p, &BlobSettings::default());
        assert_eq!(d.blobs.len(), 1, "{:?}", d.blobs);
        let b = d.blobs[0];
        assert!(b.bright && b.x == 40.0 && b.y == 50.0, "{b:?}");
        assert!((b.sigma - 4.0).abs() < 0.01, "{b:?}");
        assert_eq!(d.keypoints.len(), 1, "{:?}", d.keypoints);
        // A dark spot is found only when dark blobs count.
        let mut inv = p.clone();
        inv.data.iter_mut().for_each(|v| *v = 1.0 - *v);
        let bright_only = BlobSettings {
            polarity: Polarity::Bright,
            ..BlobSettings::default()
        };
        assert_eq!(detect(&inv, &bright_only).blobs.len(), 0);
        let d = detect(&inv, &BlobSettings::default());
        assert_eq!(d.blobs.len(), 1);
        assert!(!d.blobs[0].bright);
    }

    #[test]
    fn flat_image_has_no_blobs_or_keypoints() {
        let d = detect(&Plane::filled(64, 48, 0.6), &BlobSettings::default());
        assert!(d.blobs.is_empty() && d.keypoints.is_empty());
    }

    #[test]
    fn overlap_of_disks() {
        assert_eq!(disk_overlap(10.0, 2.0, 3.0), 0.0);
        assert_eq!(disk_overlap(0.5, 2.0, 3.0), 1.0);
        // Two unit disks at distance 1: lens area 2π/3 − √3/2 over π.
        let want = (2.0 * std::f64::consts::PI / 3.0 - 3f64.sqrt() / 2.0) / std::f64::consts::PI;
        assert!((disk_overlap(1.0, 1.0, 1.0) - want).abs() < 1e-12);
        let mut b = vec![
            Blob {
                x: 0.0,
                y: 0.0,
                sigma: 2.0,
                bright: true,
            },
            Blob {
                x: 1.0,
                y: 0.0,
                sigma: 4.0,
                bright: true,
            },
            Blob {
                x: 1.0,
                y: 0.0,
                sigma: 2.0,
                bright: false,
            },
            Blob {
                x: 30.0,
                y: 0.0,
                sigma: 2.0,
                bright: true,
            },
        ];
        prune(&mut b, 0.5);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].sigma, 4.0);
    }
}
