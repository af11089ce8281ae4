//! ccnet host toolchain: everything that runs on a workstation or cluster node.
//!
//! * [`baselines`]: the squeeze and prune baselines and the Table 2 / Table 3 experiment.
//! * [`calib`]: the accuracy model: fits of equations (1) and (2), α selection.
//! * [`cli`]: the `ccnet` command line, one module per subcommand.
//! * [`complexity`]: image complexity measures (J, B, JB and the other candidates).
//! * [`dataset`]: image + mask folders, read lazily, with the bit-depth and colour rules.
//! * [`container`]: writes `.ccn` containers (the reader lives in `ccnet-shared`).
//! * [`fsutil`]: atomic file writes.
//! * [`pack`]: batch-norm folding, weight storage types, budget-checked packing.
//! * [`paths`]: where the real datasets are found.
//! * [`plot`]: PNG bar charts and x–y plots with fitted lines.
//! * [`report`]: model summaries shared by commands.
//! * [`train`]: candle training and evaluation of the graph IR's networks.
//! * [`weights`]: float weights by stable name, safetensors import and export.

#![deny(unsafe_code)]

pub mod baselines;
pub mod calib;
pub mod cli;
pub mod complexity;
pub mod container;
pub mod dataset;
pub mod fsutil;
#[allow(unsafe_code)] // the host's one kernels module: AVX2 filters, direct GEMM calls
pub mod kernels;
pub mod pack;
pub mod paths;
pub mod plot;
pub mod report;
pub mod train;
pub mod weights;

/// The error every not-yet-built feature returns, so nothing pretends to work.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not implemented yet")]
pub struct NotImplemented(pub &'static str);
