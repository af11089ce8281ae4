//! Edge information: the mean gradient magnitude (Sobel and Scharr, each normalised to
//! estimate intensity per pixel) averaged over the levels of a Gaussian pyramid, so both
//! fine and coarse edges count.

use super::filters::{mean_gradient_magnitudes, pyramid_down, Plane, SCHARR, SOBEL};

/// Mean Sobel and Scharr gradient magnitudes averaged over `levels` pyramid levels
/// (level 0 is the image; a level stops the pyramid when a side falls below 8 pixels).
pub fn edge_information(p: &Plane, levels: u32) -> (f64, f64) {
    let mut level = p.clone();
    let (mut sobel, mut scharr, mut n) = (0.0, 0.0, 0u32);
    for i in 0..levels.max(1) {
        if i > 0 {
            if level.width < 16 || level.height < 16 {
                break;
            }
            level = pyramid_down(&level);
        }
        let [a, b] = mean_gradient_magnitudes(&level, [SOBEL, SCHARR]);
        sobel += a;
        scharr += b;
        n += 1;
    }
    (sobel / f64::from(n), scharr / f64::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkerboard(n: usize, cell: usize) -> Plane {
        Plane {
            width: n,
            height: n,
            data: (0..n * n)
                .map(|i| (((i % n) / cell + (i / n) / cell) % 2) as f32)
                .collect(),
        }
    }

    #[test]
    fn flat_has_no_edges_and_finer_checkerboards_have_more() {
        assert_eq!(edge_information(&Plane::filled(64, 64, 0.3), 4), (0.0, 0.0));
        // At full resolution a checkerboard with 4× finer cells has 4× the edge pixels.
        let (coarse, _) = edge_information(&checkerboard(128, 32), 1);
        let (fine, fine_scharr) = edge_information(&checkerboard(128, 8), 1);
        assert!(
            coarse > 0.0 && fine > 3.5 * coarse,
            "coarse {coarse} fine {fine}"
        );
        assert!(fine_scharr > 3.5 * edge_information(&checkerboard(128, 32), 1).1);
        // Over the pyramid the fine cells blur away at the coarse levels, so the ratio
        // shrinks, but the finer board still has more edge information.
        let (coarse, _) = edge_information(&checkerboard(128, 32), 4);
        let (fine, _) = edge_information(&checkerboard(128, 8), 4);
        assert!(fine > coarse, "coarse {coarse} fine {fine}");
    }
}
