//! Overlap-tile inference: an image larger than the planned tile is run tile by tile,
//! each tile with a halo, and the mask equals whole-image inference exactly.
//!
//! Two numbers of the graph make this exact:
//!
//! * the **multiple** `D`: the least common multiple of every node's spatial factor
//!   (input pixels per map pixel: strides and pools multiply it, transposed convolutions
//!   and upsampling divide it). Tiles start at multiples of `D`, so every pooling window
//!   and every stride falls on the same pixels as in the whole image.
//! * the **halo** `R`: how far, in input pixels, a wrong value at a tile's artificial
//!   border can travel inward. Per node (one side, `f` the factor of its input, `f'` of
//!   its output): convolution `max(p + s − 1, (k − 1)·d − p)·f`; max-pool
//!   `max(s − 1, k − 1)·f`; transposed convolution `max(k − 1 − p, p)·f'`; upsampling,
//!   concat, add and point-wise nodes 0. The sum over all nodes bounds every path, and is
//!   rounded up to a multiple of `D`.
//!
//! Along each axis, tiles of the planned size `T` start at `max(c − R, 0)` clamped to
//! `size − T`, where `c` is the first pixel not yet produced; a tile contributes the
//! pixels at least `R` from each of its borders that are not image borders. This needs
//! `T > 2R`.

use ccnet_shared::graph::{Graph, Op, MAX_NODES};

use crate::exec::{self, Window};
use crate::{DeviceError, Input, Model, RunInfo, ARENA_ALIGN};

/// The tiling numbers of a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileGeometry {
    /// Tiles start at multiples of this, and image sides must be multiples of it.
    pub multiple: u32,
    /// Halo in input pixels (a multiple of `multiple`).
    pub halo: u32,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Computes [`TileGeometry`] for a graph.
pub fn geometry(graph: &Graph<'_>) -> Result<TileGeometry, DeviceError> {
    let nodes = graph.nodes();
    let mut f = [1u64; MAX_NODES];
    let mut lcm = 1u64;
    let mut halo = 0u64;
    let bad = DeviceError::NotTileable;
    for (i, op) in nodes.iter().enumerate() {
        let fin = |k: usize| f[op.inputs().as_slice()[k] as usize];
        let (fi, ext) = match *op {
            Op::Input { .. } => (1, 0),
            Op::Conv2d(c) => {
                let (k, s, p, d) = (
                    u64::from(c.kernel),
                    u64::from(c.stride),
                    u64::from(c.padding),
                    u64::from(c.dilation),
                );
                let fi = fin(0).checked_mul(s).ok_or(bad)?;
                let span = (k - 1) * d;
                let e = (p + s - 1).max(span.saturating_sub(p));
                (fi, e * fin(0))
            }
            Op::MaxPool { kernel, stride, .. } => {
                let (k, s) = (u64::from(kernel), u64::from(stride));
                let fi = fin(0).checked_mul(s).ok_or(bad)?;
                (fi, (s - 1).max(k - 1) * fin(0))
            }
            Op::ConvTranspose2d(c) => {
                let (k, s, p) = (
                    u64::from(c.kernel),
                    u64::from(c.stride),
                    u64::from(c.padding),
                );
                if fin(0) % s != 0 {
                    return Err(bad);
                }
                let fo = fin(0) / s;
                (fo, (k - 1).saturating_sub(p).max(p) * fo)
            }
            Op::Upsample { factor, .. } => {
                let s = u64::from(factor);
                if fin(0) % s != 0 {
                    return Err(bad);
                }
                (fin(0) / s, 0)
            }
            Op::Concat { .. } | Op::Add { .. } => {
                if fin(0) != fin(1) {
                    return Err(bad);
                }
                (fin(0), 0)
            }
            Op::BatchNorm { .. } | Op::Relu { .. } | Op::Softmax { .. } | Op::Argmax { .. } => {
                (fin(0), 0)
            }
        };
        if fi == 0 || fi > u64::from(u32::MAX) {
            return Err(bad);
        }
        f[i] = fi;
        lcm = lcm / gcd(lcm, fi) * fi;
        halo = halo.checked_add(ext).ok_or(bad)?;
        if lcm > u64::from(u32::MAX) || halo > u64::from(u32::MAX) {
            return Err(bad);
        }
    }
    if f[nodes.len() - 1] != 1 {
        return Err(bad);
    }
    let halo = halo.div_ceil(lcm) * lcm;
    Ok(TileGeometry {
        multiple: lcm as u32,
        halo: u32::try_from(halo).map_err(|_| bad)?,
    })
}

/// One tile along one axis: it starts at `start` and contributes `[core_start, core_end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisTile {
    /// First pixel of the tile.
    pub start: u32,
    /// First pixel the tile contributes.
    pub core_start: u32,
    /// One past the last pixel it contributes.
    pub core_end: u32,
}

/// The tile after the one ending at `core_start` along an axis of `full` pixels, with
/// tiles of `tile` pixels and a halo of `halo`; `None` when the axis is done.
pub fn next_tile(
    full: u32,
    tile: u32,
    halo: u32,
    core_start: u32,
) -> Result<Option<AxisTile>, DeviceError> {
    if core_start >= full {
        return Ok(None);
    }
    if tile == 0 || tile > full {
        return Err(DeviceError::NotTileable);
    }
    let start = core_start.saturating_sub(halo).min(full - tile);
    let core_end = if start + tile == full {
        full
    } else {
        (start + tile).saturating_sub(halo)
    };
    if core_end <= core_start {
        return Err(DeviceError::NotTileable);
    }
    Ok(Some(AxisTile {
        start,
        core_start,
        core_end,
    }))
}

/// How an image is tiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TilePlan {
    /// Tile height actually used (the planned tile, or the image if smaller).
    pub tile_h: u32,
    /// Tile width actually used.
    pub tile_w: u32,
    /// The graph's tiling numbers.
    pub geometry: TileGeometry,
    /// Tiles down.
    pub tiles_y: u32,
    /// Tiles across.
    pub tiles_x: u32,
}

fn count(full: u32, tile: u32, halo: u32) -> Result<u32, DeviceError> {
    let (mut c, mut n) = (0, 0);
    while let Some(t) = next_tile(full, tile, halo, c)? {
        c = t.core_end;
        n += 1;
    }
    Ok(n)
}

impl Model<'_> {
    /// How an `height × width` image is tiled.
    pub fn tile_plan(&self, height: u32, width: u32) -> Result<TilePlan, DeviceError> {
        let geometry = geometry(&self.graph())?;
        let d = geometry.multiple;
        if height == 0 || width == 0 || height / d * d != height || width / d * d != width {
            return Err(DeviceError::ImageSize { multiple: d });
        }
        let (th, tw) = self.tile_size();
        let tile_h = (th / d * d).min(height);
        let tile_w = (tw / d * d).min(width);
        if tile_h == 0 || tile_w == 0 {
            return Err(DeviceError::NotTileable);
        }
        Ok(TilePlan {
            tile_h,
            tile_w,
            geometry,
            tiles_y: count(height, tile_h, geometry.halo)?,
            tiles_x: count(width, tile_w, geometry.halo)?,
        })
    }

    /// Scratch bytes [`Model::run_tiled`] needs for an `height × width` image (any
    /// buffer alignment).
    pub fn tiled_arena_bytes(&self, height: u32, width: u32) -> Result<usize, DeviceError> {
        let tp = self.tile_plan(height, width)?;
        Ok(self.plan(tp.tile_h, tp.tile_w)?.planned_bytes() + ARENA_ALIGN - 1)
    }

    /// Runs an image of any size (sides multiples of the graph's
    /// [`TileGeometry::multiple`]) tile by tile with only the planned tile's arena; the
    /// mask equals [`Model::run`] on the whole image.
    pub fn run_tiled(
        &self,
        input: Input<'_>,
        arena: &mut [u8],
        mask: &mut [u8],
    ) -> Result<RunInfo, DeviceError> {
        self.check_mask_head()?;
        let (h, w) = (input.height, input.width);
        let tp = self.tile_plan(h, w)?;
        let n = (h as usize) * (w as usize);
        if mask.len() != n {
            return Err(DeviceError::OutputLength {
                expected: n,
                found: mask.len(),
            });
        }
        let view = exec::InputView::whole(input, self.graph().input_channels())?
            .normalised(&self.container().header().input);
        let plan = self.plan(tp.tile_h, tp.tile_w)?;
        let out = plan.shape(plan.target()).ok_or(DeviceError::Internal)?;
        if (out.h, out.w) != (tp.tile_h, tp.tile_w) {
            return Err(DeviceError::NotTileable);
        }
        let (arena, skip) = exec::align_arena(arena, plan.planned_bytes())?;
        let halo = tp.geometry.halo;
        let mut tiles = 0;
        let mut cy = 0;
        while let Some(ty) = next_tile(h, tp.tile_h, halo, cy)? {
            let mut cx = 0;
            while let Some(tx) = next_tile(w, tp.tile_w, halo, cx)? {
                let win = Window {
                    y0: ty.start as usize,
                    y1: (ty.start + tp.tile_h) as usize,
                    x0: tx.start as usize,
                    x1: (tx.start + tp.tile_w) as usize,
                };
                self.forward(&plan, &view.window(win), arena)?;
                let core = Window {
                    y0: (ty.core_start - ty.start) as usize,
                    y1: (ty.core_end - ty.start) as usize,
                    x0: (tx.core_start - tx.start) as usize,
                    x1: (tx.core_end - tx.start) as usize,
                };
                exec::copy_mask(
                    &plan,
                    arena,
                    core,
                    mask,
                    w as usize,
                    (ty.core_start as usize, tx.core_start as usize),
                )?;
                tiles += 1;
                cx = tx.core_end;
            }
            cy = ty.core_end;
        }
        Ok(RunInfo {
            planned_bytes: plan.planned_bytes(),
            align_skip: skip,
            tiles,
        })
    }
}
