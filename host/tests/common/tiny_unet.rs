//! A tiny U-Net and a few Adam steps on it, for the tests that compare one of the
//! executor's own ops with candle's inside real training.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use ccnet_host::train::executor::Network;
use ccnet_host::train::loss::{loss, LossKind};
use ccnet_host::train::optim::Adam;
use ccnet_host::train::rng::Rng;
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::graph::Op;

/// A U-Net at α = 1/16 with batch norm, and a batch of 2 single-channel 32×32 inputs
/// (standard normal plus `offset`) with random masks (30 % foreground) as 2-class
/// one-hot targets; seed 5.
pub fn batch(offset: f64) -> Result<(Vec<Op>, Tensor, Tensor)> {
    let cfg = ArchConfig {
        arch: Arch::Unet,
        alpha: Alpha::parse("1/16").unwrap(),
        in_channels: 1,
        classes: 2,
        batch_norm: true,
    };
    let nodes = build(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (n, s) = (2, 32);
    let mut rng = Rng::new(5, 1);
    let x: Vec<f32> = (0..n * s * s)
        .map(|_| (rng.normal() + offset) as f32)
        .collect();
    let x = Tensor::from_vec(x, (n, 1, s, s), &Device::Cpu)?;
    let fg: Vec<f32> = (0..n * s * s)
        .map(|_| if rng.uniform() < 0.3 { 1.0 } else { 0.0 })
        .collect();
    let fg = Tensor::from_vec(fg, (n, 1, s, s), &Device::Cpu)?;
    let y = Tensor::cat(&[&fg.affine(-1.0, 1.0)?, &fg], 1)?;
    Ok((nodes, x, y))
}

/// `steps` Adam steps (lr 1e-3, cross-entropy + Dice) of `net` on `(x, y)`; returns the
/// loss before each step. `on_grads` sees each step's gradients before the update.
pub fn adam_steps(
    net: &Network,
    x: &Tensor,
    y: &Tensor,
    steps: usize,
    mut on_grads: impl FnMut(usize, &GradStore),
) -> Result<Vec<f32>> {
    let vars = || {
        net.trainable_names()
            .iter()
            .map(|k| (k, &net.params()[k]))
            .collect::<Vec<_>>()
    };
    let mut adam = Adam::new(vars())?;
    let mut losses = Vec::new();
    for step in 0..steps {
        let (l, _) = loss(LossKind::CrossEntropyDice, &net.forward(x, true)?, y)?;
        losses.push(l.to_scalar::<f32>()?);
        let g = l.backward()?;
        on_grads(step, &g);
        adam.step(vars(), &g, 1e-3)?;
    }
    Ok(losses)
}
