//! Runs a planned graph on the arena.

use core::ops::Range;

use ccnet_shared::format::{standardize_params, DType, InputGeometry, MAX_STANDARDIZED_CHANNELS};
use ccnet_shared::graph::{NodeId, Op, ParamRole, MAX_NODES};

use crate::kernels::{self, ConvGeom, OutputScale, Params, QParams, ShapeError};
use crate::plan::{ArenaPlan, ARENA_ALIGN};
use crate::{DeviceError, Input, InputData, Kernels, Model, Precision, SOFTMAX_QUANT};

impl From<ShapeError> for DeviceError {
    fn from(_: ShapeError) -> Self {
        DeviceError::Internal
    }
}

/// Effective int8 output quantization of every node (all `None` for float models).
#[derive(Clone, Debug)]
pub(crate) struct QTable {
    pub(crate) q: [Option<QParams>; MAX_NODES],
}

impl QTable {
    pub(crate) fn none() -> Self {
        QTable {
            q: [None; MAX_NODES],
        }
    }

    pub(crate) fn get(&self, node: NodeId) -> Option<QParams> {
        self.q.get(usize::from(node)).copied().flatten()
    }
}

/// A rectangle `[y0, y1) × [x0, x1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) y0: usize,
    pub(crate) y1: usize,
    pub(crate) x0: usize,
    pub(crate) x1: usize,
}

/// A window of a full input image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InputView<'i> {
    pub(crate) data: InputData<'i>,
    pub(crate) channels: usize,
    pub(crate) full_w: usize,
    pub(crate) full_h: usize,
    pub(crate) win: Window,
    /// Per-channel `(scale, offset)` applied to pixels: `x = p / 255 · scale + offset`.
    pub(crate) norm: [(f32, f32); MAX_STANDARDIZED_CHANNELS],
}

impl<'i> InputView<'i> {
    /// The whole image, after checking the slice length.
    pub(crate) fn whole(input: Input<'i>, channels: u32) -> Result<Self, DeviceError> {
        let (h, w) = (input.height as usize, input.width as usize);
        let expected = (channels as usize)
            .checked_mul(h)
            .and_then(|v| v.checked_mul(w))
            .ok_or(DeviceError::TooLarge)?;
        let found = match input.data {
            InputData::Pixels(p) => p.len(),
            InputData::F32(v) => v.len(),
        };
        if found != expected {
            return Err(DeviceError::InputLength { expected, found });
        }
        Ok(InputView {
            data: input.data,
            channels: channels as usize,
            full_w: w,
            full_h: h,
            win: Window {
                y0: 0,
                y1: h,
                x0: 0,
                x1: w,
            },
            norm: [(1.0, 0.0); MAX_STANDARDIZED_CHANNELS],
        })
    }

    /// Sets the pixel normalisation from the model's input geometry: its fixed
    /// `scale`/`offset`, or per-channel statistics of the whole image when it
    /// standardizes (so every tile of a tiled run uses the same numbers).
    pub(crate) fn normalised(mut self, g: &InputGeometry) -> Self {
        self.norm = match self.data {
            InputData::Pixels(p) if g.standardize => standardize_params(p, self.channels),
            _ => [(g.scale, g.offset); MAX_STANDARDIZED_CHANNELS],
        };
        self
    }

    /// The same image restricted to `win`.
    pub(crate) fn window(&self, win: Window) -> Self {
        InputView { win, ..*self }
    }
}

/// Aligns the arena start to [`ARENA_ALIGN`] and checks that `needed` bytes follow.
pub(crate) fn align_arena(
    arena: &mut [u8],
    needed: usize,
) -> Result<(&mut [u8], usize), DeviceError> {
    let addr = arena.as_ptr() as usize;
    let skip = (ARENA_ALIGN - addr % ARENA_ALIGN) % ARENA_ALIGN;
    let found = arena.len();
    let total = needed.checked_add(skip).ok_or(DeviceError::TooLarge)?;
    if found < total {
        return Err(DeviceError::ArenaTooSmall {
            needed: total,
            found,
        });
    }
    Ok((&mut arena[skip..total], skip))
}

/// Byte range of node `i`'s values (exact length, not the aligned slot).
fn data_range(plan: &ArenaPlan, i: usize) -> Range<usize> {
    let len = plan.shapes[i].elements() as usize * plan.elem_bytes;
    plan.offsets[i]..plan.offsets[i] + len
}

/// Splits the arena into the output range (mutable) and up to two disjoint input ranges.
fn split_io<'b>(
    arena: &'b mut [u8],
    out: Range<usize>,
    ins: &[Range<usize>],
) -> Result<(&'b mut [u8], [&'b [u8]; 2]), DeviceError> {
    if out.start > out.end || out.end > arena.len() {
        return Err(DeviceError::Internal);
    }
    let (left, rest) = arena.split_at_mut(out.start);
    let (mid, right) = rest.split_at_mut(out.end - out.start);
    let left: &'b [u8] = left;
    let right: &'b [u8] = right;
    let mut res: [&'b [u8]; 2] = [&[], &[]];
    for (k, r) in ins.iter().enumerate().take(2) {
        res[k] = if r.end <= out.start {
            left.get(r.clone())
        } else if r.start >= out.end {
            right.get(r.start - out.end..r.end - out.end)
        } else {
            None
        }
        .ok_or(DeviceError::Internal)?;
    }
    Ok((mid, res))
}

fn as_f32(b: &[u8]) -> Result<&[f32], DeviceError> {
    bytemuck::try_cast_slice(b).map_err(|_| DeviceError::Internal)
}

fn as_f32_mut(b: &mut [u8]) -> Result<&mut [f32], DeviceError> {
    bytemuck::try_cast_slice_mut(b).map_err(|_| DeviceError::Internal)
}

fn as_i8(b: &[u8]) -> &[i8] {
    bytemuck::cast_slice(b)
}

fn as_i8_mut(b: &mut [u8]) -> &mut [i8] {
    bytemuck::cast_slice_mut(b)
}

fn float_params<'m>(model: &Model<'m>, node: NodeId, role: ParamRole) -> Option<Params<'m>> {
    match model.tensor(node, role)? {
        (DType::F32, b) => Some(Params::F32(b)),
        (DType::F16, b) => Some(Params::F16(b)),
        _ => None,
    }
}

/// Runs every planned node.
pub(crate) fn forward(
    model: &Model<'_>,
    plan: &ArenaPlan,
    input: &InputView<'_>,
    arena: &mut [u8],
    q: &QTable,
) -> Result<(), DeviceError> {
    let nodes = model.graph().nodes();
    let int8 = model.precision() == Precision::Int8;
    let fast = model.kernels == Kernels::Fast;
    for (i, &op) in nodes.iter().enumerate().take(plan.len) {
        if !plan.needed[i] {
            continue;
        }
        let node = i as NodeId;
        let shape = plan.shapes[i];
        let (oh, ow) = (shape.h as usize, shape.w as usize);
        let out_range = data_range(plan, i);
        if plan.in_place[i] {
            // ReLU in place on its dying input.
            let buf = arena.get_mut(out_range).ok_or(DeviceError::Internal)?;
            let src = op.inputs().as_slice()[0];
            if int8 {
                let (from, to) = (q.get(src), q.get(node));
                let (from, to) = (
                    from.ok_or(DeviceError::Internal)?,
                    to.ok_or(DeviceError::Internal)?,
                );
                let y = as_i8_mut(buf);
                let floor = kernels::saturate(from.zero_point);
                for v in y.iter_mut() {
                    *v = (*v).max(floor);
                }
                kernels::rescale_i8_in_place(y, from, to)?;
            } else {
                for v in as_f32_mut(buf)?.iter_mut() {
                    *v = kernels::relu_f32(*v);
                }
            }
            continue;
        }
        let in_ids = op.inputs();
        let mut in_ranges = [0..0, 0..0];
        for (k, &j) in in_ids.as_slice().iter().enumerate() {
            in_ranges[k] = data_range(plan, j as usize);
        }
        let (out, ins) = split_io(arena, out_range, &in_ranges[..in_ids.as_slice().len()])?;
        let src_shape = |k: usize| plan.shapes[in_ids.as_slice()[k] as usize];
        let qin = |k: usize| q.get(in_ids.as_slice()[k]).ok_or(DeviceError::Internal);
        let qout = || q.get(node).ok_or(DeviceError::Internal);
        match op {
            Op::Input { .. } => {
                let qi = if int8 { q.get(0) } else { None };
                load_input(input, plan, out, qi)?
            }
            Op::Conv2d(_) | Op::ConvTranspose2d(_) => {
                let s = src_shape(0);
                // The geometry, the fused ReLU and the kernels (reference, fast) of each kind.
                let (g, relu, f32_kernels, i8_kernels): (_, _, [F32Conv; 2], [I8Conv; 2]) = match op
                {
                    Op::Conv2d(c) => (
                        ConvGeom::conv(
                            c.in_channels as usize,
                            c.out_channels as usize,
                            s.h as usize,
                            s.w as usize,
                            c.kernel as usize,
                            c.stride as usize,
                            c.padding as usize,
                            c.dilation as usize,
                        ),
                        c.relu,
                        [kernels::conv2d_f32_ref, kernels::conv2d_f32_fast],
                        [kernels::conv2d_i8_ref, kernels::conv2d_i8_fast],
                    ),
                    Op::ConvTranspose2d(c) => (
                        ConvGeom::transposed(
                            c.in_channels as usize,
                            c.out_channels as usize,
                            s.h as usize,
                            s.w as usize,
                            c.kernel as usize,
                            c.stride as usize,
                            c.padding as usize,
                        ),
                        c.relu,
                        [
                            kernels::conv_transpose2d_f32_ref,
                            kernels::conv_transpose2d_f32_fast,
                        ],
                        [
                            kernels::conv_transpose2d_i8_ref,
                            kernels::conv_transpose2d_i8_fast,
                        ],
                    ),
                    _ => return Err(DeviceError::Internal),
                };
                let g = g.ok_or(DeviceError::Internal)?;
                if (g.oh, g.ow) != (oh, ow) {
                    return Err(DeviceError::Internal);
                }
                if int8 {
                    let (w, bias, os) = int8_params(model, node, qin(0)?, qout()?, relu)?;
                    i8_kernels[usize::from(fast)](&g, as_i8(ins[0]), w, bias, &os, as_i8_mut(out))?;
                } else {
                    let w = float_params(model, node, ParamRole::Weight)
                        .ok_or(DeviceError::Internal)?;
                    let b = float_params(model, node, ParamRole::Bias);
                    f32_kernels[usize::from(fast)](
                        &g,
                        as_f32(ins[0])?,
                        w,
                        b,
                        relu,
                        as_f32_mut(out)?,
                    )?;
                }
            }
            Op::Relu { .. } => {
                if int8 {
                    let (from, to) = (qin(0)?, qout()?);
                    let y = as_i8_mut(out);
                    let floor = kernels::saturate(from.zero_point);
                    for (o, &v) in y.iter_mut().zip(as_i8(ins[0])) {
                        *o = v.max(floor);
                    }
                    kernels::rescale_i8_in_place(y, from, to)?;
                } else {
                    for (o, &v) in as_f32_mut(out)?.iter_mut().zip(as_f32(ins[0])?) {
                        *o = kernels::relu_f32(v);
                    }
                }
            }
            Op::MaxPool { kernel, stride, .. } => {
                let s = src_shape(0);
                let (c, ih, iw) = (s.c as usize, s.h as usize, s.w as usize);
                let (k, st) = (kernel as usize, stride as usize);
                if int8 {
                    let y = as_i8_mut(out);
                    kernels::max_pool(c, ih, iw, k, st, as_i8(ins[0]), oh, ow, y)?;
                    kernels::rescale_i8_in_place(y, qin(0)?, qout()?)?;
                } else {
                    let y = as_f32_mut(out)?;
                    kernels::max_pool(c, ih, iw, k, st, as_f32(ins[0])?, oh, ow, y)?;
                }
            }
            Op::Upsample { factor, .. } => {
                let s = src_shape(0);
                let (c, ih, iw, f) = (s.c as usize, s.h as usize, s.w as usize, factor as usize);
                if int8 {
                    let y = as_i8_mut(out);
                    kernels::upsample(c, ih, iw, f, as_i8(ins[0]), y)?;
                    kernels::rescale_i8_in_place(y, qin(0)?, qout()?)?;
                } else {
                    kernels::upsample(c, ih, iw, f, as_f32(ins[0])?, as_f32_mut(out)?)?;
                }
            }
            Op::Concat { .. } => {
                let split = ins[0].len();
                if split > out.len() {
                    return Err(DeviceError::Internal);
                }
                let (ya, yb) = out.split_at_mut(split);
                if int8 {
                    let to = qout()?;
                    kernels::rescale_i8(as_i8(ins[0]), qin(0)?, to, as_i8_mut(ya))?;
                    kernels::rescale_i8(as_i8(ins[1]), qin(1)?, to, as_i8_mut(yb))?;
                } else {
                    if yb.len() != ins[1].len() {
                        return Err(DeviceError::Internal);
                    }
                    ya.copy_from_slice(ins[0]);
                    yb.copy_from_slice(ins[1]);
                }
            }
            Op::Add { .. } => {
                if int8 {
                    kernels::add_i8(
                        as_i8(ins[0]),
                        qin(0)?,
                        as_i8(ins[1]),
                        qin(1)?,
                        qout()?,
                        as_i8_mut(out),
                    )?;
                } else {
                    let (a, b) = (as_f32(ins[0])?, as_f32(ins[1])?);
                    let y = as_f32_mut(out)?;
                    if a.len() != y.len() || b.len() != y.len() {
                        return Err(DeviceError::Internal);
                    }
                    for ((o, &va), &vb) in y.iter_mut().zip(a).zip(b) {
                        *o = va + vb;
                    }
                }
            }
            Op::Softmax { .. } => {
                let s = src_shape(0);
                let (c, n) = (s.c as usize, (s.h * s.w) as usize);
                if int8 {
                    softmax_i8(c, n, as_i8(ins[0]), qin(0)?, as_i8_mut(out))?;
                } else {
                    kernels::softmax_f32(c, n, as_f32(ins[0])?, as_f32_mut(out)?)?;
                }
            }
            Op::Argmax { .. } => {
                let s = src_shape(0);
                let (c, n) = (s.c as usize, (s.h * s.w) as usize);
                if int8 {
                    let y: &mut [u8] = out;
                    if y.len() != n {
                        return Err(DeviceError::Internal);
                    }
                    kernels::argmax(c, n, as_i8(ins[0]), |p, k| y[p] = k as u8)?;
                } else {
                    let y = as_f32_mut(out)?;
                    if y.len() != n {
                        return Err(DeviceError::Internal);
                    }
                    kernels::argmax(c, n, as_f32(ins[0])?, |p, k| y[p] = k as f32)?;
                }
            }
            Op::BatchNorm { .. } => return Err(DeviceError::UnfoldedBatchNorm { node }),
        }
    }
    Ok(())
}

/// int8 softmax: dequantize, [`kernels::softmax_f32`] per pixel (channel by channel),
/// quantize with [`SOFTMAX_QUANT`].
fn softmax_i8(c: usize, n: usize, x: &[i8], qx: QParams, y: &mut [i8]) -> Result<(), DeviceError> {
    if x.len() != c * n || y.len() != c * n || c == 0 || c > 1024 {
        return Err(DeviceError::Internal);
    }
    let mut xs = [0f32; 1024];
    let mut ys = [0f32; 1024];
    for p in 0..n {
        for ch in 0..c {
            xs[ch] = qx.dequantize(x[ch * n + p]);
        }
        kernels::softmax_f32(c, 1, &xs[..c], &mut ys[..c])?;
        for ch in 0..c {
            y[ch * n + p] = SOFTMAX_QUANT.quantize(ys[ch]);
        }
    }
    Ok(())
}

/// A float convolution kernel (conv or transposed conv, reference or fast).
type F32Conv = fn(
    &ConvGeom,
    &[f32],
    Params<'_>,
    Option<Params<'_>>,
    bool,
    &mut [f32],
) -> Result<(), ShapeError>;

/// An int8 convolution kernel (conv or transposed conv, reference or fast).
type I8Conv = fn(
    &ConvGeom,
    &[i8],
    &[i8],
    Option<&[u8]>,
    &OutputScale<'_>,
    &mut [i8],
) -> Result<(), ShapeError>;

type Int8Params<'m> = (&'m [i8], Option<&'m [u8]>, OutputScale<'m>);

fn int8_params<'m>(
    model: &Model<'m>,
    node: NodeId,
    qin: QParams,
    qout: QParams,
    relu: bool,
) -> Result<Int8Params<'m>, DeviceError> {
    let w = match model.tensor(node, ParamRole::Weight) {
        Some((DType::I8, b)) => bytemuck::cast_slice::<u8, i8>(b),
        _ => return Err(DeviceError::Internal),
    };
    let bias = match model.tensor(node, ParamRole::Bias) {
        Some((DType::I32, b)) => Some(b),
        None => None,
        _ => return Err(DeviceError::Internal),
    };
    let scales = match model.tensor(node, ParamRole::WeightScale) {
        Some((DType::F32, b)) => b,
        _ => return Err(DeviceError::Internal),
    };
    Ok((
        w,
        bias,
        OutputScale {
            weight_scales: scales,
            input: qin,
            output: qout,
            relu,
        },
    ))
}

/// Fills node 0's buffer from the input window (normalising pixels, quantizing for int8).
fn load_input(
    input: &InputView<'_>,
    plan: &ArenaPlan,
    out: &mut [u8],
    q: Option<QParams>,
) -> Result<(), DeviceError> {
    let s = plan.shapes[0];
    let (c, h, w) = (s.c as usize, s.h as usize, s.w as usize);
    let win = input.win;
    if c != input.channels
        || win.y1 - win.y0 != h
        || win.x1 - win.x0 != w
        || win.y1 > input.full_h
        || win.x1 > input.full_w
    {
        return Err(DeviceError::Internal);
    }
    let plane = input.full_h * input.full_w;
    let value = |idx: usize| -> f32 {
        match input.data {
            InputData::Pixels(p) => {
                let (scale, offset) = input
                    .norm
                    .get(idx / plane.max(1))
                    .copied()
                    .unwrap_or((1.0, 0.0));
                (f32::from(p.get(idx).copied().unwrap_or(0)) / 255.0) * scale + offset
            }
            InputData::F32(v) => v.get(idx).copied().unwrap_or(0.0),
        }
    };
    let mut k = 0;
    match q {
        Some(q) => {
            let y = as_i8_mut(out);
            if y.len() != c * h * w {
                return Err(DeviceError::Internal);
            }
            for ch in 0..c {
                for yy in win.y0..win.y1 {
                    let row = (ch * input.full_h + yy) * input.full_w;
                    for xx in win.x0..win.x1 {
                        y[k] = q.quantize(value(row + xx));
                        k += 1;
                    }
                }
            }
        }
        None => {
            let y = as_f32_mut(out)?;
            if y.len() != c * h * w {
                return Err(DeviceError::Internal);
            }
            for ch in 0..c {
                for yy in win.y0..win.y1 {
                    let row = (ch * input.full_h + yy) * input.full_w;
                    for xx in win.x0..win.x1 {
                        y[k] = value(row + xx);
                        k += 1;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Copies the `src` window of the final arg-max map into `mask` (row length `mask_w`) at
/// `dst = (dy, dx)`.
pub(crate) fn copy_mask(
    plan: &ArenaPlan,
    arena: &[u8],
    src: Window,
    mask: &mut [u8],
    mask_w: usize,
    dst: (usize, usize),
) -> Result<(), DeviceError> {
    let t = plan.target() as usize;
    let s = plan.shapes[t];
    let (h, w) = (s.h as usize, s.w as usize);
    if s.c != 1 || src.y1 > h || src.x1 > w || src.y0 > src.y1 || src.x0 > src.x1 {
        return Err(DeviceError::Internal);
    }
    let buf = arena
        .get(data_range(plan, t))
        .ok_or(DeviceError::Internal)?;
    let width = src.x1 - src.x0;
    for yy in src.y0..src.y1 {
        let start = (dst.0 + yy - src.y0) * mask_w + dst.1;
        let row = mask
            .get_mut(start..start + width)
            .ok_or(DeviceError::Internal)?;
        let base = yy * w + src.x0;
        if plan.elem_bytes == 1 {
            let v = buf.get(base..base + width).ok_or(DeviceError::Internal)?;
            row.copy_from_slice(v);
        } else {
            let v = as_f32(buf)?;
            let v = v.get(base..base + width).ok_or(DeviceError::Internal)?;
            for (o, &c) in row.iter_mut().zip(v) {
                *o = c as u8;
            }
        }
    }
    Ok(())
}

/// Writes node `node`'s output as real values.
pub(crate) fn read_node(
    plan: &ArenaPlan,
    arena: &[u8],
    node: NodeId,
    q: &QTable,
    is_argmax: bool,
    out: &mut [f32],
) -> Result<(), DeviceError> {
    let buf = arena
        .get(data_range(plan, node as usize))
        .ok_or(DeviceError::Internal)?;
    if out.len() * plan.elem_bytes != buf.len() {
        return Err(DeviceError::Internal);
    }
    if plan.elem_bytes == 4 {
        out.copy_from_slice(as_f32(buf)?);
    } else if is_argmax {
        for (o, &b) in out.iter_mut().zip(buf) {
            *o = f32::from(b);
        }
    } else {
        let qp = q.get(node).ok_or(DeviceError::Internal)?;
        for (o, &b) in out.iter_mut().zip(as_i8(buf)) {
            *o = qp.dequantize(b);
        }
    }
    Ok(())
}
