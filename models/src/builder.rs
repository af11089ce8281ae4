//! A small helper that appends nodes and tracks channel counts while a builder runs.

use alloc::vec::Vec;

use ccnet_shared::alpha::Alpha;
use ccnet_shared::graph::{Conv2d, ConvTranspose2d, NodeId, Op};

use crate::{ArchConfig, ModelError};

/// Appends nodes in topological order.
pub(crate) struct Builder {
    nodes: Vec<Op>,
    channels: Vec<u32>,
    alpha: Alpha,
    batch_norm: bool,
    /// Input channels of the network.
    pub in_channels: u32,
    /// Classes of the classifier.
    pub classes: u32,
}

/// Batch-norm epsilon used by every builder.
pub(crate) const BN_EPS: f32 = 1e-5;

impl Builder {
    pub(crate) fn new(cfg: &ArchConfig) -> Self {
        Builder {
            nodes: Vec::new(),
            channels: Vec::new(),
            alpha: cfg.alpha,
            batch_norm: cfg.batch_norm,
            in_channels: cfg.in_channels,
            classes: cfg.classes,
        }
    }

    pub(crate) fn finish(self) -> Vec<Op> {
        self.nodes
    }

    fn push(&mut self, op: Op, channels: u32) -> NodeId {
        self.nodes.push(op);
        self.channels.push(channels);
        (self.nodes.len() - 1) as NodeId
    }

    /// Channels of node `id`.
    pub(crate) fn channels(&self, id: NodeId) -> u32 {
        self.channels[id as usize]
    }

    /// Width-scaled channel count of a layer with `base` channels at α = 1.
    pub(crate) fn width(&self, base: u32) -> Result<u32, ModelError> {
        Ok(self.alpha.scale(base)?)
    }

    pub(crate) fn input(&mut self) -> NodeId {
        let c = self.in_channels;
        self.push(Op::Input { channels: c }, c)
    }

    /// A `k × k` "same" convolution to exactly `out` channels, with bias, no activation.
    pub(crate) fn conv(&mut self, x: NodeId, out: u32, k: u16) -> NodeId {
        self.conv_op(x, out, k, true)
    }

    fn conv_op(&mut self, x: NodeId, out: u32, k: u16, bias: bool) -> NodeId {
        let op = Op::Conv2d(Conv2d {
            input: x,
            in_channels: self.channels(x),
            out_channels: out,
            kernel: k,
            stride: 1,
            padding: k / 2,
            dilation: 1,
            bias,
            relu: false,
        });
        self.push(op, out)
    }

    /// A hidden layer: `k × k` same convolution to `width(base)` channels, then batch
    /// norm (if the recipe asks for it, in which case the convolution has no bias), then
    /// ReLU.
    pub(crate) fn conv_relu(&mut self, x: NodeId, base: u32, k: u16) -> Result<NodeId, ModelError> {
        let out = self.width(base)?;
        let mut y = self.conv_op(x, out, k, !self.batch_norm);
        if self.batch_norm {
            y = self.push(
                Op::BatchNorm {
                    input: y,
                    channels: out,
                    eps: BN_EPS,
                },
                out,
            );
        }
        Ok(self.push(Op::Relu { input: y }, out))
    }

    /// A chain of hidden 3 × 3 layers of `base` channels.
    pub(crate) fn conv_block(
        &mut self,
        mut x: NodeId,
        base: u32,
        n: usize,
    ) -> Result<NodeId, ModelError> {
        for _ in 0..n {
            x = self.conv_relu(x, base, 3)?;
        }
        Ok(x)
    }

    /// 2 × 2 max-pool with stride 2.
    pub(crate) fn pool(&mut self, x: NodeId) -> NodeId {
        let c = self.channels(x);
        self.push(
            Op::MaxPool {
                input: x,
                kernel: 2,
                stride: 2,
            },
            c,
        )
    }

    /// Transposed convolution to exactly `out` channels, upsampling by `stride`.
    pub(crate) fn up(
        &mut self,
        x: NodeId,
        out: u32,
        kernel: u16,
        stride: u16,
        padding: u16,
    ) -> NodeId {
        let op = Op::ConvTranspose2d(ConvTranspose2d {
            input: x,
            in_channels: self.channels(x),
            out_channels: out,
            kernel,
            stride,
            padding,
            bias: true,
            relu: false,
        });
        self.push(op, out)
    }

    pub(crate) fn concat(&mut self, a: NodeId, b: NodeId) -> NodeId {
        let c = self.channels(a) + self.channels(b);
        self.push(Op::Concat { a, b }, c)
    }

    pub(crate) fn add(&mut self, a: NodeId, b: NodeId) -> NodeId {
        let c = self.channels(a);
        self.push(Op::Add { a, b }, c)
    }

    pub(crate) fn argmax(&mut self, x: NodeId) -> NodeId {
        self.push(Op::Argmax { input: x }, 1)
    }
}
