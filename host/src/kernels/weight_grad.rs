//! The weight gradient of a stride-1 convolution, computed directly from the input and
//! the output gradient instead of through a column matrix and a GEMM.
//!
//! `dW[co][ci][ky][kx] = Σ_{oy,ox} dY[co][oy][ox] · X[ci][oy+ky−p][ox+kx−p]`. On large
//! planes with few channels (the top levels of a U-Net) the column-matrix route writes
//! `C·k²` copies of every input pixel and the GEMM packs them again, for a product whose
//! output is tiny (`Cout × C·k²`) and whose inner dimension is the whole plane. Here a
//! register tile of `MR` output channels × `k` kernel columns (8-lane AVX2 vectors,
//! fused multiply-adds) runs over a zero-padded copy of each image, for one input
//! channel and kernel row at a time, strip by strip of output rows (so the strip of
//! `dY` stays in the L1 cache); the lanes are summed once at the end.
//!
//! Images and blocks of output channels are independent tasks (rayon); the per-image
//! parts are summed in image order, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::has_avx2_fma;
use super::stride1::Stride1Conv;

/// Lanes of one vector (AVX2, `f32`).
const LANES: usize = 8;
/// Floats of one strip of the padded `dY` rows of a channel block (16 KiB: L1-resident).
const STRIP_FLOATS: usize = 4096;

/// Output channels per register tile for kernel width `k` (`MR · k` accumulators of the
/// 16 vector registers), `None` for widths without an instance.
fn tile_channels(k: usize) -> Option<usize> {
    match k {
        3 => Some(4),
        5 => Some(2),
        _ => None,
    }
}

/// Whether [`conv_weight_grad`] computes this geometry on this CPU (AVX2 and FMA,
/// `k` ∈ {3, 5}, padding below `k`).
pub fn supported(g: &Stride1Conv) -> bool {
    tile_channels(g.k).is_some() && g.pad < g.k && g.out().is_some() && has_avx2_fma()
}

/// One image's zero-padded operands: `x` as `cin × ph × pw` planes (`ph = ho + k − 1`,
/// `pw = wv + k − 1`) and `dY` as `blocks × ho × mr × wv` (the rows of a tile's `mr`
/// channels side by side), where `wv` is `wo` rounded up to whole vectors and the last
/// block is filled up with zero channels (zeros in the extra columns and channels add
/// nothing).
struct Padded {
    x: Vec<f32>,
    dy: Vec<f32>,
}

/// Sizes of the padded operands.
#[derive(Clone, Copy, Debug)]
struct Layout {
    ho: usize,
    wo: usize,
    wv: usize,
    ph: usize,
    pw: usize,
    mr: usize,
    blocks: usize,
}

impl Layout {
    fn new(g: &Stride1Conv, mr: usize) -> Option<Layout> {
        let (ho, wo) = g.out()?;
        let wv = wo.div_ceil(LANES) * LANES;
        Some(Layout {
            ho,
            wo,
            wv,
            ph: ho + g.k - 1,
            pw: wv + g.k - 1,
            mr,
            blocks: g.cout.div_ceil(mr),
        })
    }
}

fn pad_image(g: &Stride1Conv, l: &Layout, x: &[f32], dy: &[f32]) -> Padded {
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
    let mut dyp = vec![0f32; l.blocks * l.mr * l.ho * l.wv];
    for (co, src) in dy.chunks_exact(l.ho * l.wo).enumerate() {
        let (cb, j) = (co / l.mr, co % l.mr);
        for (oy, row) in src.chunks_exact(l.wo).enumerate() {
            let o = ((cb * l.ho + oy) * l.mr + j) * l.wv;
            dyp[o..o + l.wo].copy_from_slice(row);
        }
    }
    Padded { x: xp, dy: dyp }
}

/// `dw = Σ_images dW` of a batch of `n` images: `x` `(n, cin, h, w)`, `dy`
/// `(n, cout, ho, wo)`, `dw` `(cout, cin, k, k)` (overwritten), all contiguous.
/// Returns `false`, leaving `dw` untouched, where [`supported`] is false.
///
/// # Panics
/// When a slice's length does not match the geometry.
pub fn conv_weight_grad(g: &Stride1Conv, n: usize, x: &[f32], dy: &[f32], dw: &mut [f32]) -> bool {
    if !supported(g) {
        return false;
    }
    let (Some(mr), Some((ho, wo))) = (tile_channels(g.k), g.out()) else {
        return false;
    };
    let Some(l) = Layout::new(g, mr) else {
        return false;
    };
    let kk = g.k * g.k;
    assert_eq!(x.len(), n * g.cin * g.h * g.w, "weight grad: input length");
    assert_eq!(dy.len(), n * g.cout * ho * wo, "weight grad: dY length");
    assert_eq!(dw.len(), g.cout * g.cin * kk, "weight grad: dW length");
    let padded: Vec<Padded> = (0..n)
        .into_par_iter()
        .map(|i| {
            let xi = &x[i * g.cin * g.h * g.w..(i + 1) * g.cin * g.h * g.w];
            let di = &dy[i * g.cout * ho * wo..(i + 1) * g.cout * ho * wo];
            pad_image(g, &l, xi, di)
        })
        .collect();
    let part = mr * g.cin * kk;
    let parts: Vec<Vec<f32>> = (0..n * l.blocks)
        .into_par_iter()
        .map(|t| {
            let (img, cb) = (t / l.blocks, t % l.blocks);
            let mut out = vec![0f32; part];
            block(g, &l, &padded[img], cb, &mut out);
            out
        })
        .collect();
    dw.fill(0.0);
    for img in 0..n {
        for cb in 0..l.blocks {
            let p = &parts[img * l.blocks + cb];
            let rows = mr.min(g.cout - cb * mr);
            let dst = &mut dw[cb * mr * g.cin * kk..(cb * mr + rows) * g.cin * kk];
            for (d, v) in dst.iter_mut().zip(p) {
                *d += v;
            }
        }
    }
    true
}

/// The `mr` output channels of block `cb` of one image into `out`
/// (`mr × cin × k × k`).
fn block(g: &Stride1Conv, l: &Layout, p: &Padded, cb: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(has_avx2_fma(), "weight grad: no AVX2/FMA");
        assert_eq!(p.x.len(), g.cin * l.ph * l.pw);
        assert_eq!(p.dy.len(), l.blocks * l.mr * l.ho * l.wv);
        assert!(cb < l.blocks && out.len() == l.mr * g.cin * g.k * g.k);
        // SAFETY: AVX2 and FMA are present (asserted above), and the buffers have the
        // lengths of the layout (asserted above), which is what `block_avx2` reads.
        unsafe {
            match (l.mr, g.k) {
                (4, 3) => x86::block_avx2::<4, 3>(g.cin, l, p, cb, out),
                (2, 5) => x86::block_avx2::<2, 5>(g.cin, l, p, cb, out),
                _ => unreachable!("weight grad: no instance for k = {}", g.k),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, l, p, cb, out);
        unreachable!("weight grad: not supported on this target");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{Layout, Padded, LANES, STRIP_FLOATS};

    /// Safety: the CPU has AVX2 and FMA; `p.x` holds `cin × ph × pw` floats, `p.dy`
    /// `blocks × ho × M × wv`, `cb < blocks`, `out` `M × cin × K × K`, and
    /// `l.ph = l.ho + K − 1`, `l.pw = l.wv + K − 1`, `l.wv` a multiple of [`LANES`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2<const M: usize, const K: usize>(
        cin: usize,
        l: &Layout,
        p: &Padded,
        cb: usize,
        out: &mut [f32],
    ) {
        let strip = (STRIP_FLOATS / (M * l.wv)).max(1);
        let mut sums = vec![_mm256_setzero_ps(); M * cin * K * K];
        let xs = p.x.as_ptr();
        let ds = p.dy.as_ptr();
        let mut r0 = 0;
        while r0 < l.ho {
            let r1 = (r0 + strip).min(l.ho);
            for ci in 0..cin {
                for ky in 0..K {
                    let mut acc = [[_mm256_setzero_ps(); K]; M];
                    for oy in r0..r1 {
                        // SAFETY: `oy + ky < ho + K − 1 = ph` and `ci < cin`: the row
                        // lies inside `p.x`; rows `(cb, oy, j)` inside `p.dy`.
                        let xrow = unsafe { xs.add((ci * l.ph + oy + ky) * l.pw) };
                        let mut drow = [ds; M];
                        for (j, d) in drow.iter_mut().enumerate() {
                            // SAFETY: as above.
                            *d = unsafe { ds.add(((cb * l.ho + oy) * M + j) * l.wv) };
                        }
                        let mut ox = 0;
                        while ox < l.wv {
                            let mut xv = [_mm256_setzero_ps(); K];
                            for (kx, v) in xv.iter_mut().enumerate() {
                                // SAFETY: `ox + kx + LANES ≤ wv + K − 1 = pw`: inside
                                // the padded input row.
                                *v = unsafe { _mm256_loadu_ps(xrow.add(ox + kx)) };
                            }
                            // One dY vector at a time: `M·K` accumulators, `K` input
                            // vectors and one dY vector fill the 16 registers.
                            for j in 0..M {
                                // SAFETY: `ox + LANES ≤ wv`: inside the `dY` row.
                                let dv = unsafe { _mm256_loadu_ps(drow[j].add(ox)) };
                                for kx in 0..K {
                                    acc[j][kx] = _mm256_fmadd_ps(dv, xv[kx], acc[j][kx]);
                                }
                            }
                            ox += LANES;
                        }
                    }
                    for (j, aj) in acc.iter().enumerate() {
                        for (kx, a) in aj.iter().enumerate() {
                            let s = &mut sums[((j * cin + ci) * K + ky) * K + kx];
                            *s = _mm256_add_ps(*s, *a);
                        }
                    }
                }
            }
            r0 = r1;
        }
        for (o, s) in out.iter_mut().zip(&sums) {
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds exactly one vector.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *s) };
            *o = lanes.iter().sum();
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
            // (cin, cout, h, w, k, pad, n): channel counts off the tile, widths off the
            // vector, "same" and "valid" padding, both kernel widths.
            (3, 5, 9, 13, 3, 1, 2),
            (2, 4, 17, 16, 3, 0, 1),
            (1, 7, 11, 21, 3, 2, 3),
            (4, 3, 12, 10, 5, 2, 2),
            (2, 1, 9, 9, 5, 0, 1),
        ];
        each_shape(&shapes, |i, g, n| {
            let (ho, wo) = g.out().unwrap();
            let x = values(n * g.cin * g.h * g.w, 2 * i + 1);
            let dy = values(n * g.cout * ho * wo, 2 * i + 2);
            let mut dw = vec![f32::NAN; g.cout * g.cin * g.k * g.k];
            assert!(conv_weight_grad(&g, n, &x, &dy, &mut dw));
            let mut want = vec![0f64; dw.len()];
            for_each_term(&g, n, &x, |[img, co, ci, ky, kx, oy, ox], xv| {
                let dv = dy[((img * g.cout + co) * ho + oy) * wo + ox];
                want[((co * g.cin + ci) * g.k + ky) * g.k + kx] += xv * f64::from(dv);
            });
            assert_close(&dw, &want, &g);
        });
    }

    #[test]
    fn declines_what_it_has_no_instance_for() {
        let g = Stride1Conv {
            cin: 2,
            cout: 2,
            h: 8,
            w: 8,
            k: 7,
            pad: 3,
        };
        assert!(!supported(&g));
        let mut dw = vec![1f32; 2 * 2 * 49];
        assert!(!conv_weight_grad(&g, 1, &[0.0; 128], &[0.0; 128], &mut dw));
        assert!(dw.iter().all(|&v| v == 1.0), "dw untouched");
        let too_small = Stride1Conv {
            k: 3,
            pad: 0,
            h: 2,
            ..g
        };
        assert!(!supported(&too_small));
    }
}
