//! Stride-1 convolution computed directly with fused multiply-adds: the forward pass and
//! the input gradient of the training convolutions on large planes.
//!
//! A register tile of 6 (or 4) output channels × 16 output pixels of one row (two 8-lane
//! AVX2 vectors per channel, 12 or 8 accumulators) runs over every tap `(ci, ky, kx)`: it
//! loads the two input vectors the tap reads from a zero-padded copy of the image and
//! multiplies them by each channel's broadcast weight. The weights of a channel block
//! are packed tap by tap beforehand, so the broadcasts walk them in order.
//!
//! The device engine's panel kernel computes the same convolution without fused
//! multiply-adds (bit-identical to its reference) and with 4-channel tiles; for training,
//! which needs no bit-exact match to the device, this one does about twice the work per
//! instruction. Images and channel blocks are independent rayon tasks writing disjoint
//! output planes, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::has_avx2_fma;
use super::stride1::Stride1Conv;

/// Lanes of one vector (AVX2, `f32`).
const LANES: usize = 8;

/// A register tile: `mr` output channels × `nv` vectors of pixels (`mr · nv` ≤ 12
/// accumulators, plus the input vectors and one broadcast weight in 16 registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tile {
    mr: usize,
    nv: usize,
}

impl Tile {
    /// The tile for `cout` output channels: 6 × 16 pixels (the faster instance per
    /// multiply-add), unless rounding the channels up to sixes computes over 10 % more
    /// idle channels than rounding up to fours (16 and 32 channels: 4 × 16 pixels).
    /// Measured in `docs/training.md`.
    fn for_channels(cout: usize) -> Tile {
        let (six, four) = (cout.div_ceil(6) * 6, cout.div_ceil(4) * 4);
        if 10 * six > 11 * four {
            Tile { mr: 4, nv: 2 }
        } else {
            Tile { mr: 6, nv: 2 }
        }
    }

    /// Output pixels per tile.
    fn nr(self) -> usize {
        self.nv * LANES
    }
}

/// Whether [`conv2d_direct`] computes this geometry on this CPU (AVX2 and FMA, a
/// non-empty output).
pub fn supported(g: &Stride1Conv) -> bool {
    g.k > 0 && g.cin > 0 && g.cout > 0 && g.out().is_some() && has_avx2_fma()
}

/// Sizes of the padded input: `cin × ph × pw` planes, `ph = ho + k − 1`, `pw` the output
/// width rounded up to whole tiles plus `k − 1` (a partial tile reads zeros).
#[derive(Clone, Copy, Debug)]
struct Layout {
    ho: usize,
    wo: usize,
    ph: usize,
    pw: usize,
}

impl Layout {
    fn new(g: &Stride1Conv, t: Tile) -> Option<Layout> {
        let (ho, wo) = g.out()?;
        Some(Layout {
            ho,
            wo,
            ph: ho + g.k - 1,
            pw: wo.div_ceil(t.nr()) * t.nr() + g.k - 1,
        })
    }
}

/// One image's input, zero-padded to the [`Layout`].
fn pad_image(g: &Stride1Conv, l: &Layout, x: &[f32]) -> Vec<f32> {
    let mut xp = vec![0f32; g.cin * l.ph * l.pw];
    for (src, dst) in x
        .chunks_exact(g.h * g.w)
        .zip(xp.chunks_exact_mut(l.ph * l.pw))
    {
        for (iy, row) in src.chunks_exact(g.w).enumerate() {
            let o = (iy + g.pad) * l.pw + g.pad;
            dst[o..o + g.w].copy_from_slice(row);
        }
    }
    xp
}

/// The weights of channel block `cb` packed tap by tap: `[ci][ky][kx][j]` for the
/// block's `mr` channels (zeros past `cout`).
fn pack_block(g: &Stride1Conv, w: &[f32], mr: usize, cb: usize) -> Vec<f32> {
    let kk = g.k * g.k;
    let mut wp = vec![0f32; g.cin * kk * mr];
    for j in 0..mr.min(g.cout - cb * mr) {
        let co = cb * mr + j;
        for (t, &v) in w[co * g.cin * kk..(co + 1) * g.cin * kk].iter().enumerate() {
            wp[t * mr + j] = v;
        }
    }
    wp
}

/// `y = conv(x, w)` for a batch of `n` images: `x` `(n, cin, h, w)`, `w`
/// `(cout, cin, k, k)`, `y` `(n, cout, ho, wo)` (overwritten), all contiguous. Returns
/// `false`, leaving `y` untouched, where [`supported`] is false.
///
/// # Panics
/// When a slice's length does not match the geometry.
pub fn conv2d_direct(g: &Stride1Conv, n: usize, x: &[f32], w: &[f32], y: &mut [f32]) -> bool {
    if !supported(g) {
        return false;
    }
    let tile = Tile::for_channels(g.cout);
    let Some(l) = Layout::new(g, tile) else {
        return false;
    };
    let plane = l.ho * l.wo;
    let in_image = g.cin * g.h * g.w;
    assert_eq!(x.len(), n * in_image, "direct conv: input length");
    assert_eq!(
        w.len(),
        g.cout * g.cin * g.k * g.k,
        "direct conv: weight length"
    );
    assert_eq!(y.len(), n * g.cout * plane, "direct conv: output length");
    let blocks = g.cout.div_ceil(tile.mr);
    let packed: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|cb| pack_block(g, w, tile.mr, cb))
        .collect();
    let padded: Vec<Vec<f32>> = x
        .par_chunks(in_image)
        .map(|xi| pad_image(g, &l, xi))
        .collect();
    y.par_chunks_mut(g.cout * plane)
        .zip(&padded)
        .for_each(|(yi, xp)| {
            yi.par_chunks_mut(tile.mr * plane)
                .zip(&packed)
                .for_each(|(ys, wp)| block(g, tile, &l, xp, wp, ys));
        });
    true
}

/// The output planes `ys` (`nb ≤ mr` channels) of one channel block of one image.
fn block(g: &Stride1Conv, t: Tile, l: &Layout, xp: &[f32], wp: &[f32], ys: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(has_avx2_fma(), "direct conv: no AVX2/FMA");
        assert_eq!(xp.len(), g.cin * l.ph * l.pw);
        assert_eq!(wp.len(), g.cin * g.k * g.k * t.mr);
        assert!(l.pw >= l.wo.div_ceil(t.nr()) * t.nr() + g.k - 1);
        let plane = l.ho * l.wo;
        assert!(!ys.is_empty() && ys.len().is_multiple_of(plane) && ys.len() / plane <= t.mr);
        // SAFETY: AVX2 and FMA are present, and the buffers have the lengths of the
        // layout for this tile (all asserted above), which is what `block_avx2` reads and
        // writes.
        unsafe {
            match (t.mr, t.nv) {
                (6, 2) => x86::block_avx2::<6, 2>(g.cin, g.k, l, xp, wp, ys),
                (4, 2) => x86::block_avx2::<4, 2>(g.cin, g.k, l, xp, wp, ys),
                _ => unreachable!("direct conv: no instance for {t:?}"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, t, l, xp, wp, ys);
        unreachable!("direct conv: not supported on this target");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{Layout, LANES};

    /// Safety: the CPU has AVX2 and FMA; `xp` holds `cin × ph × pw` floats with
    /// `ph = ho + k − 1` and `pw ≥ ⌈wo / nr⌉·nr + k − 1` (`nr = NV · LANES` ≤ 16);
    /// `wp` holds `cin·k²·MR`; `ys` holds `nb × ho × wo` with `1 ≤ nb ≤ MR`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2<const MR: usize, const NV: usize>(
        cin: usize,
        k: usize,
        l: &Layout,
        xp: &[f32],
        wp: &[f32],
        ys: &mut [f32],
    ) {
        let plane = l.ho * l.wo;
        let nb = ys.len() / plane;
        let nr = NV * LANES;
        let (xs, ws) = (xp.as_ptr(), wp.as_ptr());
        for oy in 0..l.ho {
            let mut ox = 0;
            while ox < l.wo {
                let mut acc = [[_mm256_setzero_ps(); NV]; MR];
                let mut wt = ws;
                for ci in 0..cin {
                    for ky in 0..k {
                        // SAFETY: `ci < cin` and `oy + ky < ho + k − 1 = ph`: the row
                        // lies inside `xp`.
                        let xrow = unsafe { xs.add((ci * l.ph + oy + ky) * l.pw + ox) };
                        for kx in 0..k {
                            let mut xv = [_mm256_setzero_ps(); NV];
                            for (v, x) in xv.iter_mut().enumerate() {
                                // SAFETY: `ox + kx + (v + 1)·LANES ≤ ⌈wo/nr⌉·nr + k − 1
                                // ≤ pw`: inside the padded row.
                                *x = unsafe { _mm256_loadu_ps(xrow.add(kx + v * LANES)) };
                            }
                            for a in acc.iter_mut() {
                                // SAFETY: `wt` walks the `cin·k²·MR` packed weights,
                                // one per (tap, channel), and stays inside `wp`.
                                let wv = unsafe { _mm256_broadcast_ss(&*wt) };
                                wt = unsafe { wt.add(1) };
                                for v in 0..NV {
                                    a[v] = _mm256_fmadd_ps(wv, xv[v], a[v]);
                                }
                            }
                        }
                    }
                }
                let n = nr.min(l.wo - ox);
                for (j, a) in acc.iter().enumerate().take(nb) {
                    let dst = &mut ys[j * plane + oy * l.wo + ox..][..n];
                    let mut lanes = [0f32; 2 * LANES];
                    for (v, av) in a.iter().enumerate() {
                        // SAFETY: `lanes` holds `NV` vectors.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(v * LANES), *av) };
                    }
                    dst.copy_from_slice(&lanes[..n]);
                }
                ox += nr;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::stride1::testing::{assert_close, each_shape, for_each_term, values};

    #[test]
    fn matches_the_definition_on_odd_shapes() {
        let shapes = [
            // (cin, cout, h, w, k, pad, n): channel counts off the tile (6 and 2 take the
            // 6-channel tile, 7, 13, 3 and 1 the 4-channel one), widths off and on the
            // tile, "same", "valid" and "full" padding, kernel sizes 1, 3, 5.
            (3, 7, 9, 13, 3, 1, 2),
            (2, 6, 17, 16, 3, 0, 1),
            (1, 13, 11, 35, 3, 2, 3),
            (4, 3, 12, 10, 5, 2, 2),
            (5, 2, 8, 33, 1, 0, 1),
            (2, 1, 9, 9, 5, 4, 1),
        ];
        each_shape(&shapes, |i, g, n| {
            let (ho, wo) = g.out().unwrap();
            let x = values(n * g.cin * g.h * g.w, 2 * i + 1);
            let wt = values(g.cout * g.cin * g.k * g.k, 2 * i + 2);
            let mut y = vec![f32::NAN; n * g.cout * ho * wo];
            assert!(conv2d_direct(&g, n, &x, &wt, &mut y));
            let mut want = vec![0f64; y.len()];
            for_each_term(&g, n, &x, |[img, co, ci, ky, kx, oy, ox], xv| {
                let wv = wt[((co * g.cin + ci) * g.k + ky) * g.k + kx];
                want[((img * g.cout + co) * ho + oy) * wo + ox] += xv * f64::from(wv);
            });
            assert_close(&y, &want, &g);
        });
    }

    #[test]
    fn declines_an_empty_output() {
        let g = Stride1Conv {
            cin: 1,
            cout: 1,
            h: 2,
            w: 2,
            k: 3,
            pad: 0,
        };
        assert!(!supported(&g));
        let mut y = vec![1f32; 4];
        assert!(!conv2d_direct(&g, 1, &[0.0; 4], &[0.0; 9], &mut y));
        assert!(y.iter().all(|&v| v == 1.0), "y untouched");
    }
}
