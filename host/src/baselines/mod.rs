//! The paper's baselines and its comparison experiment.
//!
//! * [`squeeze`]: SqueezeNet fire modules in place of hidden 3×3 convolutions.
//! * [`prune`]: filter pruning that physically removes channels, across skip
//!   concatenations too.
//! * [`table2`]: `ccnet experiment table2`, Table 2 (accuracy and size) and Table 3
//!   (training time) of base, squeezed, pruned and CC-Net networks.

pub mod prune;
pub mod squeeze;
pub mod table2;
