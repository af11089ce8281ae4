//! A convolution followed by training-mode batch norm (and ReLU) as one autograd op.
//!
//! candle's backward pass gives every intermediate tensor its own gradient slot: a
//! zero-filled tensor the size of the activation, to which the incoming gradient is
//! then added (a fresh third tensor). For a convolution whose only reader is a batch
//! norm, the convolution's output is such an intermediate, and on the large planes of a
//! U-Net's top levels these two passes over memory cost as much as a small convolution.
//! [`ConvBnOp`] runs [`Conv2dOp`] and [`BatchNormOp`] back to back inside one op: the
//! convolution's output never becomes a graph node (the op keeps it for its backward
//! pass, as the graph kept it before), and the batch norm's input gradient goes straight
//! into the convolution's backward pass. Same arithmetic as the two ops in turn.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};

use super::batch_norm::{BatchNormOp, Stats};
use super::conv::Conv2dOp;
use super::cpu_data::contiguous_f32;

/// [`Conv2dOp`] then [`BatchNormOp`] (training mode) on `(x, w, gamma ‖ beta)`, where
/// the third argument holds the `C` scales followed by the `C` shifts.
#[derive(Debug)]
pub struct ConvBnOp {
    conv: Conv2dOp,
    bn: BatchNormOp,
    /// The convolution's output, kept by the forward pass for the backward pass.
    conv_out: Mutex<Option<Tensor>>,
}

/// `gamma` and `beta` as storages with their layouts, from the packed third argument.
fn split_params(
    s: &CpuStorage,
    l: &Layout,
    c: usize,
) -> candle_core::Result<[(CpuStorage, Layout); 2]> {
    let gb = contiguous_f32(s, l, "conv + batch norm: gamma and beta")?;
    if gb.len() != 2 * c {
        candle_core::bail!(
            "conv + batch norm: {} scale and shift values for {c} channels",
            gb.len()
        );
    }
    let part = |r: std::ops::Range<usize>| {
        (
            CpuStorage::F32(gb[r].to_vec()),
            Layout::contiguous(Shape::from(c)),
        )
    };
    Ok([part(0..c), part(c..2 * c)])
}

impl CustomOp3 for ConvBnOp {
    fn name(&self) -> &'static str {
        "ccnet-conv-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, y_shape) = self.conv.cpu_fwd(s1, l1, s2, l2)?;
        let y_layout = Layout::contiguous(y_shape.clone());
        let [(gamma, gl), (beta, bl)] = split_params(s3, l3, self.conv.cout)?;
        let out = self.bn.cpu_fwd(&y, &y_layout, &gamma, &gl, &beta, &bl)?;
        let CpuStorage::F32(y) = y else {
            candle_core::bail!("conv + batch norm: the convolution's output is not f32");
        };
        let y = Tensor::from_vec(y, y_shape, &Device::Cpu)?;
        *self
            .conv_out
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv + batch norm: poisoned".into()))? = Some(y);
        Ok(out)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let y = self
            .conv_out
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv + batch norm: poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("conv + batch norm: backward pass before forward".into())
            })?;
        let c = self.conv.cout;
        let gamma = gb.narrow(0, 0, c)?;
        let beta = gb.narrow(0, c, c)?;
        let (dy, dgamma, dbeta) = self.bn.grads(&y, &gamma, &beta, grad, true)?;
        let dy = dy.ok_or_else(|| {
            candle_core::Error::Msg("conv + batch norm: no gradient for the convolution".into())
        })?;
        let (dx, dw) = self.conv.bwd(x, w, &y, &dy)?;
        let dgb = match (dgamma, dbeta) {
            (Some(a), Some(b)) => Some(Tensor::cat(&[&a, &b], 0)?),
            _ => None,
        };
        Ok((dx, dw, dgb))
    }
}

/// `relu?(batch_norm(conv2d(x, w)))` in training mode as one [`ConvBnOp`]: `x`
/// `(N, Cin, H, W)`, `w` `(Cout, Cin, kh, kw)` (no bias), `gamma`, `beta` `[Cout]`.
/// Returns the output and the batch statistics (as [`super::batch_norm::fused_train`]).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (padding, stride, dilation): (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<(Tensor, Stats)> {
    let conv = super::conv::conv2d_op(x, w, padding, stride, dilation)?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let op = ConvBnOp {
        conv,
        bn: BatchNormOp {
            train: true,
            relu,
            eps,
            stats: stats.clone(),
        },
        conv_out: Mutex::new(None),
    };
    let gb = Tensor::cat(&[gamma, beta], 0)?;
    let y = x
        .contiguous()?
        .apply_op3(&w.contiguous()?, &gb.contiguous()?, op)?;
    let s = stats
        .lock()
        .map_err(|_| anyhow::anyhow!("conv + batch norm: poisoned statistics"))?
        .clone();
    Ok((y, s))
}
