//! Training and evaluation of the graph IR's networks with candle (CPU by default,
//! CUDA behind the `cuda` feature).
//!
//! * [`executor`]: one interpreter of the graph for every architecture.
//! * [`conv`]: fast CPU convolutions (banded im2col + GEMM, direct kernels on large planes).
//! * [`batch_norm`]: fused CPU batch norm (+ ReLU) with its own backward pass.
//! * [`conv_bn`]: a convolution and its training-mode batch norm (+ ReLU) as one op.
//! * [`upcat`]: a decoder's up-convolution (+ bias) and its concatenation behind the
//!   skip connection as one op.
//! * [`pool`]: exact CPU max-pool (the whole gradient to each window's first maximum).
//! * [`cpu_data`]: reading tensors in place and sizing rayon tasks for those ops.
//! * [`op_switch`]: the process-wide choice between those own ops and candle's.
//! * [`data`]: in-memory samples, input normalisation, augmented random crops.
//! * [`loss`], [`optim`], [`recipe`]: what is minimised, how, and with which settings.
//! * [`metrics`]: foreground F1 (Dice) and IU (Jaccard).
//! * [`init`]: initial parameter values (He-normal, bilinear score up-sampling).
//! * [`infer`]: tiled inference over full-size images.
//! * [`checkpoint`], [`run`]: the run folder, the training loop, resume.
//! * [`evaluate`]: `ccnet eval`'s per-image metrics, latency and overlays.

pub mod batch_norm;
pub mod checkpoint;
pub mod conv;
pub mod conv_bn;
pub mod cpu_data;
pub mod data;
pub mod evaluate;
pub mod executor;
pub mod infer;
pub mod init;
pub mod loss;
pub mod metrics;
pub mod op_switch;
pub mod optim;
pub mod pool;
pub mod recipe;
pub mod rng;
pub mod run;
pub mod upcat;
