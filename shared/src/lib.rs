//! ccnet's shared core, used bit for bit by the host toolchain and the device engine.
//!
//! `#![no_std]` and allocation-free: everything here works on borrowed slices and
//! fixed-capacity containers so that a Cortex-M target can use it unchanged.
//!
//! * [`graph`]: the network description (one IR for training and inference), shape
//!   inference, parameter / MAC / activation-byte accounting.
//! * [`plan`]: activation liveness and the peak-memory lower bound.
//! * [`format`]: the `.ccn` container (see `FORMAT.md`), a zero-copy validating reader.
//! * [`quant`]: fixed-point requantization shared by host and device.
//! * [`budget`]: the one parser for byte budgets such as `1MB` or `256KiB`.
//! * [`alpha`]: the width multiplier and the channel rounding rule.
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod alpha;
pub mod budget;
pub mod format;
pub mod graph;
pub mod plan;
pub mod quant;
