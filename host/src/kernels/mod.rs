//! The host's low-level kernels, the one module of the host crate allowed `unsafe` (each
//! block with a `// SAFETY:` note), behind safe functions:
//!
//! * [`filters`]: separable image filters for the complexity measures, with AVX2 builds
//!   chosen at run time;
//! * [`gemm`]: strided matrix products through the `gemm` crate, for the training
//!   convolutions (writing into and accumulating onto slices in place).

pub mod filters;
pub mod gemm;
