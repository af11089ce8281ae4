//! Architecture builders: U-Net, FCN-8s and CUMedVision as [`ccnet_shared::graph`] graphs
//! at any width multiplier α, number of input channels and classes.
//!
//! The builders know nothing about tensors; the host trains the graph they return and the
//! device runs the same graph from a packed file. Every convolution's output channels are
//! scaled by α with the rule of [`ccnet_shared::alpha::Alpha::scale`] (round half up,
//! never zero), except the classifier outputs (fixed to `classes`). The network input
//! keeps its channels. Layer configurations are documented on each builder and in
//! `models/ARCHITECTURES.md`.
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

mod builder;
mod cumed;
mod fcn;
mod unet;

use alloc::vec::Vec;
use core::{fmt, str::FromStr};

use ccnet_shared::alpha::{Alpha, AlphaError};
use ccnet_shared::graph::{Graph, GraphError, Op};

/// A supported network family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// U-Net (Ronneberger et al. 2015).
    Unet,
    /// FCN-8s on a VGG-16 backbone (Long et al. 2015).
    Fcn,
    /// CUMedVision (Chen et al. 2016).
    Cumed,
}

impl Arch {
    /// Every architecture.
    pub const ALL: [Arch; 3] = [Arch::Unet, Arch::Fcn, Arch::Cumed];

    /// Command-line name (`unet`, `fcn`, `cumed`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Unet => "unet",
            Arch::Fcn => "fcn",
            Arch::Cumed => "cumed",
        }
    }

    /// The paper's log10 of the base network's parameter count (α = 1, 1 input channel,
    /// 2 classes).
    pub fn paper_log10_params(self) -> f64 {
        match self {
            Arch::Unet => 7.492,
            Arch::Fcn => 7.552,
            Arch::Cumed => 6.887,
        }
    }

    /// Input height and width must be multiples of this (the total down-sampling).
    pub fn input_multiple(self) -> u32 {
        match self {
            Arch::Unet => 16,
            Arch::Fcn => 32,
            Arch::Cumed => 8,
        }
    }

    /// Checks that an `height × width` input maps back to a same-sized mask.
    pub fn check_input(self, height: u32, width: u32) -> Result<(), ModelError> {
        let m = self.input_multiple();
        if height == 0 || width == 0 || !height.is_multiple_of(m) || !width.is_multiple_of(m) {
            return Err(ModelError::InputSize {
                height,
                width,
                multiple: m,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An architecture name that is not known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownArch;

impl fmt::Display for UnknownArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown architecture (expected one of: unet, fcn, cumed)"
        )
    }
}

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "unet" | "u-net" => Ok(Arch::Unet),
            "fcn" | "fcn8s" | "fcn-8s" => Ok(Arch::Fcn),
            "cumed" | "cumedvision" => Ok(Arch::Cumed),
            _ => Err(UnknownArch),
        }
    }
}

/// What to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchConfig {
    /// Network family.
    pub arch: Arch,
    /// Width multiplier.
    pub alpha: Alpha,
    /// Input channels (1 gray, 3 RGB).
    pub in_channels: u32,
    /// Output classes (≥ 2; foreground/background segmentation is 2).
    pub classes: u32,
    /// Insert a batch-norm node after every hidden convolution (training recipe; such
    /// convolutions have no bias, and packing folds the batch norm back into a bias).
    pub batch_norm: bool,
}

impl ArchConfig {
    /// The paper's setting: 1 input channel, 2 classes, no batch norm.
    pub fn new(arch: Arch, alpha: Alpha) -> Self {
        ArchConfig {
            arch,
            alpha,
            in_channels: 1,
            classes: 2,
            batch_norm: false,
        }
    }
}

/// Why a network could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelError {
    /// The width multiplier is invalid for this network.
    Alpha(AlphaError),
    /// Zero input channels.
    NoInputChannels,
    /// Fewer than 2 classes.
    TooFewClasses,
    /// The built graph is invalid (a bug in a builder).
    Graph(GraphError),
    /// The input size is not a multiple of the network's total down-sampling.
    InputSize {
        /// Requested height.
        height: u32,
        /// Requested width.
        width: u32,
        /// Required multiple.
        multiple: u32,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Alpha(e) => write!(f, "{e}"),
            ModelError::NoInputChannels => write!(f, "the input must have at least 1 channel"),
            ModelError::TooFewClasses => write!(f, "segmentation needs at least 2 classes"),
            ModelError::Graph(e) => write!(f, "internal error, invalid graph: {e}"),
            ModelError::InputSize {
                height,
                width,
                multiple,
            } => write!(
                f,
                "input {height}x{width} is not a positive multiple of {multiple} on both sides"
            ),
        }
    }
}

impl From<AlphaError> for ModelError {
    fn from(e: AlphaError) -> Self {
        ModelError::Alpha(e)
    }
}

/// Builds the graph for `cfg`: nodes in topological order, ending with the logits
/// convolution followed by an [`Op::Argmax`] head.
pub fn build(cfg: &ArchConfig) -> Result<Vec<Op>, ModelError> {
    if cfg.in_channels == 0 {
        return Err(ModelError::NoInputChannels);
    }
    if cfg.classes < 2 {
        return Err(ModelError::TooFewClasses);
    }
    let mut b = builder::Builder::new(cfg);
    match cfg.arch {
        Arch::Unet => unet::build(&mut b)?,
        Arch::Fcn => fcn::build(&mut b)?,
        Arch::Cumed => cumed::build(&mut b)?,
    }
    let nodes = b.finish();
    Graph::new(&nodes).map_err(ModelError::Graph)?;
    Ok(nodes)
}

/// Trainable parameters of the deployed network for `cfg` (batch norm folded away, i.e.
/// the count of the same network built without batch norm).
pub fn deployed_params(cfg: &ArchConfig) -> Result<u64, ModelError> {
    let plain = ArchConfig {
        batch_norm: false,
        ..*cfg
    };
    Ok(Graph::new_unchecked(&build(&plain)?).trainable_params())
}
