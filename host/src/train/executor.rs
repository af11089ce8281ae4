//! One candle executor for every graph of the IR: U-Net, FCN, CUMedVision and any later
//! variant train and run without model-specific code.
//!
//! Parameters live in one ordered map keyed by stable names `<param_name>.<role>`
//! (`conv07.weight`, `conv07.bias`, `convt02.weight`, `bn05.gamma`, `bn05.beta`,
//! `bn05.running_mean`, `bn05.running_var`), the names of
//! [`Graph::param_name`] and [`ParamRole::name`]. Shapes are candle's natural ones:
//! convolution weights `[out, in, k, k]`, transposed-convolution weights
//! `[in, out, k, k]`, every vector (bias, gamma, beta, running statistics) `[channels]`.
//!
//! All convolution calls go through [`conv2d`] and [`conv_transpose2d`] so faster
//! kernels can be swapped in at one place.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use ccnet_shared::graph::{Graph, Op, ParamRole};

use super::batch_norm;
use super::conv;
use super::conv_bn;
use super::init;
use super::rng::Rng;
use super::upcat;

/// Batch-norm running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// A graph with its parameters on a candle device.
pub struct Network {
    nodes: Vec<Op>,
    device: Device,
    params: BTreeMap<String, Var>,
    trainable: Vec<String>,
    logits: usize,
}

/// The name of one parameter tensor: `<node name>.<role>`.
pub fn tensor_name(graph: &Graph<'_>, id: usize, role: ParamRole) -> Result<String> {
    let pn = graph
        .param_name(id as u16)
        .ok_or_else(|| anyhow!("node {id} has no parameters"))?;
    Ok(format!("{pn}.{}", role.name()))
}

/// The candle shape of a parameter tensor given the IR's 4-D description.
fn natural_shape(role: ParamRole, dims: [u32; 4]) -> Vec<usize> {
    match role {
        ParamRole::Weight => dims.iter().map(|&d| d as usize).collect(),
        _ => vec![dims[0] as usize],
    }
}

/// The node whose output is the logits: the graph's last node, skipping a trailing
/// arg-max or softmax head.
pub fn logits_node(nodes: &[Op]) -> usize {
    let mut id = nodes.len() - 1;
    while let Op::Argmax { input } | Op::Softmax { input } = nodes[id] {
        id = input as usize;
    }
    id
}

impl Network {
    /// Builds the network with freshly initialised parameters ([`init`]): He-normal
    /// convolution weights (from `rng`, so a seed fixes them), bilinear class-score
    /// up-sampling, zero biases, batch norm `gamma = 1`, `beta = 0`, running mean 0 and
    /// variance 1.
    pub fn new(nodes: &[Op], device: &Device, rng: &mut Rng) -> Result<Network> {
        let graph = Graph::new_with_scratch(nodes, &mut vec![0; nodes.len()])
            .map_err(|e| anyhow!("invalid graph: {e}"))?;
        let mut params = BTreeMap::new();
        let mut trainable = Vec::new();
        for (id, op) in nodes.iter().enumerate() {
            for &(role, dims) in op.param_tensors().as_slice() {
                let name = tensor_name(&graph, id, role)?;
                let shape = natural_shape(role, dims);
                let n: usize = shape.iter().product();
                let data = init::initial_values(op, role, n, rng);
                let t = Tensor::from_vec(data, shape, device)?;
                params.insert(name.clone(), Var::from_tensor(&t)?);
                if role.is_trainable() {
                    trainable.push(name);
                }
            }
        }
        Ok(Network {
            nodes: nodes.to_vec(),
            device: device.clone(),
            params,
            trainable,
            logits: logits_node(nodes),
        })
    }

    /// The graph's nodes.
    pub fn nodes(&self) -> &[Op] {
        &self.nodes
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every named parameter tensor (trainable ones and batch-norm running statistics).
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// Names of the trainable tensors, in graph order.
    pub fn trainable_names(&self) -> &[String] {
        &self.trainable
    }

    /// The trainable variables, in graph order.
    pub fn trainable_vars(&self) -> Vec<&Var> {
        self.trainable.iter().map(|n| &self.params[n]).collect()
    }

    /// Number of trainable scalars held by candle.
    pub fn trainable_count(&self) -> u64 {
        self.trainable_vars()
            .iter()
            .map(|v| v.elem_count() as u64)
            .sum()
    }

    fn p(&self, name: String) -> Result<&Tensor> {
        self.params
            .get(&name)
            .map(|v| v.as_tensor())
            .ok_or_else(|| anyhow!("missing parameter {name}"))
    }

    /// Runs the graph on a batch `x` of shape `(N, C, H, W)` and returns the logits
    /// `(N, classes, H, W)`. In training mode batch norm uses batch statistics and
    /// updates its running statistics; otherwise it uses the running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let graph = Graph::new_unchecked(&self.nodes);
        // Last reader of every node, so intermediate maps are dropped early.
        let mut last_use = vec![0usize; self.logits + 1];
        for (id, op) in self.nodes.iter().enumerate().take(self.logits + 1) {
            for &i in op.inputs().as_slice() {
                last_use[i as usize] = id;
            }
        }
        // A `BatchNorm → Relu` pair whose ReLU is the batch norm's only reader is computed
        // as one fused op (in fused batch-norm mode); the ReLU node then passes it on.
        let mut readers = vec![0usize; self.logits + 1];
        for op in self.nodes.iter().take(self.logits + 1) {
            for &i in op.inputs().as_slice() {
                readers[i as usize] += 1;
            }
        }
        let fuse_relu = batch_norm::use_fused(x);
        let mut relu_done = vec![false; self.logits + 1];
        // Ops computed by the node after them, when it is their only reader: in training,
        // a bias-free `Conv2d` by its `BatchNorm` ([`conv_bn`], fused batch norm and fast
        // convolutions); an up-convolution (kernel = stride, no padding, bias, no ReLU) by
        // the `Concat` behind a skip connection ([`upcat`]). The fused node passes its
        // input on and `takes_previous[next]` tells the next node to run both.
        let fast = conv::mode() == conv::Mode::Fast && conv::supports(x);
        let fuse_conv_bn = train && fuse_relu && fast;
        let mut takes_previous = vec![false; self.logits + 1];
        let only_read_by_next = |id: usize, reads: &dyn Fn(&Op) -> bool| {
            readers[id] == 1 && self.nodes.get(id + 1).is_some_and(reads)
        };
        let mut vals: Vec<Option<Tensor>> = vec![None; self.logits + 1];
        for id in 0..=self.logits {
            let op = self.nodes[id];
            let get = |i: u16| -> Result<&Tensor> {
                vals[i as usize]
                    .as_ref()
                    .ok_or_else(|| anyhow!("node {i} was freed before node {id}"))
            };
            let name = |role| tensor_name(&graph, id, role);
            let out = match op {
                Op::Input { channels } => {
                    let c = x.dim(1)?;
                    if c != channels as usize {
                        bail!("input has {c} channels, the network expects {channels}");
                    }
                    x.clone()
                }
                Op::Conv2d(c)
                    if fuse_conv_bn
                        && !c.bias
                        && !c.relu
                        && only_read_by_next(
                            id,
                            &|n| matches!(n, &Op::BatchNorm { input, .. } if input as usize == id),
                        ) =>
                {
                    takes_previous[id + 1] = true;
                    get(c.input)?.clone()
                }
                Op::Conv2d(c) => {
                    let w = self.p(name(ParamRole::Weight)?)?;
                    let b = if c.bias {
                        Some(self.p(name(ParamRole::Bias)?)?)
                    } else {
                        None
                    };
                    let y = conv2d(
                        get(c.input)?,
                        w,
                        b,
                        c.padding.into(),
                        c.stride.into(),
                        c.dilation.into(),
                    )?;
                    if c.relu {
                        y.relu()?
                    } else {
                        y
                    }
                }
                Op::ConvTranspose2d(c)
                    if fast
                        && c.bias
                        && !c.relu
                        && c.padding == 0
                        && c.kernel == c.stride
                        && only_read_by_next(
                            id,
                            &|n| matches!(n, &Op::Concat { b, .. } if b as usize == id),
                        ) =>
                {
                    takes_previous[id + 1] = true;
                    get(c.input)?.clone()
                }
                Op::ConvTranspose2d(c) => {
                    let w = self.p(name(ParamRole::Weight)?)?;
                    let b = if c.bias {
                        Some(self.p(name(ParamRole::Bias)?)?)
                    } else {
                        None
                    };
                    let y =
                        conv_transpose2d(get(c.input)?, w, b, c.padding.into(), c.stride.into())?;
                    if c.relu {
                        y.relu()?
                    } else {
                        y
                    }
                }
                Op::BatchNorm {
                    input,
                    channels,
                    eps,
                } => {
                    let relu_next = fuse_relu
                        && readers[id] == 1
                        && matches!(self.nodes.get(id + 1), Some(&Op::Relu { input }) if input as usize == id);
                    if relu_next {
                        relu_done[id + 1] = true;
                    }
                    let conv = match self.nodes[input as usize] {
                        Op::Conv2d(c) if takes_previous[id] => Some((
                            self.p(tensor_name(&graph, input as usize, ParamRole::Weight)?)?,
                            (c.padding.into(), c.stride.into(), c.dilation.into()),
                        )),
                        _ => None,
                    };
                    self.batch_norm(
                        &graph,
                        id,
                        get(input)?,
                        conv,
                        channels as usize,
                        eps,
                        train,
                        relu_next,
                    )?
                }
                Op::Relu { input } if relu_done[id] => get(input)?.clone(),
                Op::Relu { input } => get(input)?.relu()?,
                Op::MaxPool {
                    input,
                    kernel,
                    stride,
                } => {
                    // Exact mode: the whole gradient to each window's first maximum
                    // (candle's pool scales it by the share of maxima; see `pool`).
                    let (t, k, s) = (get(input)?, usize::from(kernel), usize::from(stride));
                    if super::pool::use_exact(t) {
                        super::pool::max_pool2d(t, k, s)?
                    } else {
                        t.max_pool2d_with_stride(k, s)?
                    }
                }
                Op::Upsample { input, factor } => {
                    let t = get(input)?;
                    let (_, _, h, w) = t.dims4()?;
                    let f = usize::from(factor);
                    t.upsample_nearest2d(h * f, w * f)?
                }
                Op::Concat { a, b } if takes_previous[id] => {
                    let Op::ConvTranspose2d(c) = self.nodes[b as usize] else {
                        bail!("node {id}: the fused up-convolution is missing");
                    };
                    let w = self.p(tensor_name(&graph, b as usize, ParamRole::Weight)?)?;
                    let bias = self.p(tensor_name(&graph, b as usize, ParamRole::Bias)?)?;
                    upcat::upconv_cat(get(a)?, get(b)?, w, bias, c.stride.into())?
                }
                Op::Concat { a, b } => Tensor::cat(&[get(a)?, get(b)?], 1)?,
                Op::Add { a, b } => (get(a)? + get(b)?)?,
                Op::Softmax { input } => candle_nn::ops::softmax(get(input)?, 1)?,
                Op::Argmax { input } => get(input)?.argmax_keepdim(1)?.to_dtype(DType::F32)?,
            };
            vals[id] = Some(out);
            for &i in op.inputs().as_slice() {
                if last_use[i as usize] == id {
                    vals[i as usize] = None;
                }
            }
        }
        vals[self.logits]
            .take()
            .ok_or_else(|| anyhow!("the graph produced no output"))
    }

    /// Batch norm of node `id` (followed by ReLU when `relu`: the executor fuses a
    /// `BatchNorm → Relu` pair whose ReLU is the batch norm's only reader). Fused mode
    /// ([`batch_norm::mode`]): one [`batch_norm::BatchNormOp`]; otherwise candle tensor
    /// ops. Training mode updates the running statistics the same way in both:
    /// `r ← (1 − m)·r + m·s`, `m` = [`BN_MOMENTUM`], `s` the batch mean and the unbiased
    /// batch variance (biased · M / (M − 1), `M = N·H·W`; as PyTorch).
    ///
    /// With `conv` = `(w, (padding, stride, dilation))` (training, fused mode), `x` is
    /// the input of the bias-free convolution that feeds the batch norm, and both run as
    /// one [`conv_bn::ConvBnOp`].
    #[allow(clippy::too_many_arguments)]
    fn batch_norm(
        &self,
        graph: &Graph<'_>,
        id: usize,
        x: &Tensor,
        conv: Option<(&Tensor, (usize, usize, usize))>,
        channels: usize,
        eps: f32,
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        let name = |role| tensor_name(graph, id, role);
        let gamma = self.p(name(ParamRole::Gamma)?)?;
        let beta = self.p(name(ParamRole::Beta)?)?;
        let rm_name = name(ParamRole::RunningMean)?;
        let rv_name = name(ParamRole::RunningVar)?;
        let fused = batch_norm::use_fused(x);
        if let Some((w, cfg)) = conv {
            if !(train && fused) {
                bail!("batch norm {id}: a convolution is fused in only in fused training mode");
            }
            let (y, s) = conv_bn::conv_bn_train(x, w, gamma, beta, cfg, eps, relu)?;
            return self.update_running_stats(graph, id, &y, s, channels);
        }
        if !train {
            let (rm, rv) = (self.p(rm_name)?, self.p(rv_name)?);
            if fused {
                return batch_norm::fused_eval(x, gamma, beta, rm, rv, eps, relu);
            }
            let y = batch_norm::composed_eval(x, gamma, beta, rm, rv, eps)?;
            return Ok(if relu { y.relu()? } else { y });
        }
        if fused {
            let (y, s) = batch_norm::fused_train(x, gamma, beta, eps, relu)?;
            return self.update_running_stats(graph, id, &y, s, channels);
        }
        let (y, mean, var) = batch_norm::composed_train(x, gamma, beta, eps)?;
        let y = if relu { y.relu()? } else { y };
        self.blend_running_stats(graph, id, &y, &mean, &var)?;
        Ok(y)
    }

    /// [`Self::blend_running_stats`] with the batch statistics of a fused op; returns
    /// `y`.
    fn update_running_stats(
        &self,
        graph: &Graph<'_>,
        id: usize,
        y: &Tensor,
        s: batch_norm::Stats,
        channels: usize,
    ) -> Result<Tensor> {
        let mean = Tensor::from_vec(s.mean, channels, y.device())?;
        let var = Tensor::from_vec(s.var, channels, y.device())?;
        self.blend_running_stats(graph, id, y, &mean, &var)?;
        Ok(y.clone())
    }

    /// Running statistics of batch norm `id` from the batch mean and biased variance of
    /// its output `y`'s batch: exponential average, unbiased variance (as PyTorch).
    fn blend_running_stats(
        &self,
        graph: &Graph<'_>,
        id: usize,
        y: &Tensor,
        mean: &Tensor,
        var: &Tensor,
    ) -> Result<()> {
        let name = |role| tensor_name(graph, id, role);
        let rm_name = name(ParamRole::RunningMean)?;
        let rv_name = name(ParamRole::RunningVar)?;
        let (n, _, h, w) = y.dims4()?;
        let count = (n * h * w) as f64;
        let unbias = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        let rm = &self.params[&rm_name];
        let rv = &self.params[&rv_name];
        let m = BN_MOMENTUM;
        let new_rm = (rm.as_tensor().detach().affine(1.0 - m, 0.0)?
            + mean.detach().flatten_all()?.affine(m, 0.0)?)?;
        let new_rv = (rv.as_tensor().detach().affine(1.0 - m, 0.0)?
            + var.detach().flatten_all()?.affine(m * unbias, 0.0)?)?;
        rm.set(&new_rm)?;
        rv.set(&new_rv)?;
        Ok(())
    }

    /// All parameter tensors by name (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Replaces every parameter from `tensors`; names and shapes must match exactly.
    /// `what` names the source in error messages.
    pub fn load(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
        what: &str,
    ) -> Result<()> {
        for (name, var) in &self.params {
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow!("{what}: tensor `{name}` is missing"))?;
            if t.dims() != var.dims() {
                bail!(
                    "{what}: tensor `{name}` has shape {:?}, the network needs {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            let t = t
                .to_dtype(DType::F32)?
                .to_device(&self.device)
                .with_context(|| format!("{what}: tensor `{name}`"))?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// 2-D convolution with optional bias (the one place convolutions are computed).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let y = if conv::enabled() && conv::supports(x) {
        conv::conv2d(x, w, padding, stride, dilation)?
    } else {
        x.conv2d(w, padding, stride, dilation, 1)?
    };
    add_bias(y, b)
}

/// 2-D transposed convolution with optional bias (the one place they are computed).
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, k, k2) = w.dims4()?;
    if k == stride && k2 == stride && padding == 0 {
        // Non-overlapping up-convolution (U-Net's 2×2, stride 2): one matrix product and
        // a pixel shuffle; exact, and its backward pass is far cheaper in candle. With the
        // fast convolutions both are one op ([`conv::UpConvOp`]) with its own backward.
        if conv::mode() == conv::Mode::Fast && conv::supports(x) {
            return add_bias(conv::upconv(x, w, stride)?, b);
        }
        return add_bias(pixel_shuffle_up(x, w, stride)?, b);
    }
    let y = if conv::enabled() && conv::supports(x) {
        conv::conv_transpose2d(x, w, padding, stride, 1)?
    } else {
        x.conv_transpose2d(w, padding, 0, stride, 1)?
    };
    add_bias(y, b)
}

/// `conv_transpose2d` for `kernel == stride`, no padding: every input pixel writes its
/// own `s × s` output block, `y[n, o, h·s+i, w·s+j] = Σ_c x[n, c, h, w] · W[c, o, i, j]`.
fn pixel_shuffle_up(x: &Tensor, w: &Tensor, s: usize) -> Result<Tensor> {
    let (n, ci, h, wd) = x.dims4()?;
    let co = w.dim(1)?;
    let rows = x
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((n * h * wd, ci))?;
    let y = rows.matmul(&w.reshape((ci, co * s * s))?)?;
    Ok(y.reshape((n, h, wd, co, s, s))?
        .permute((0, 3, 1, 4, 2, 5))?
        .contiguous()?
        .reshape((n, co, h * s, wd * s))?)
}

/// `y + b` per channel; in fused mode ([`batch_norm::mode`], which covers the fused
/// element-wise ops) one [`conv::BiasAdd`] (its bias gradient is a parallel per-plane
/// sum), else candle's broadcast add.
fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) if batch_norm::use_fused(&y) && y.rank() == 4 => conv::add_bias(&y, b),
        Some(b) => {
            let c = b.dim(0)?;
            Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
        }
        None => Ok(y),
    }
}
