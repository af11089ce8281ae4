//! The host's low-level kernels, the one module of the host crate allowed `unsafe` (each
//! block with a `// SAFETY:` note), behind safe functions:
//!
//! * [`filters`]: separable image filters for the complexity measures, with AVX2 builds
//!   chosen at run time;
//! * [`gemm`]: strided matrix products through the `gemm` crate, for the training
//!   convolutions (writing into and accumulating onto slices in place);
//! * [`direct_conv`]: stride-1 convolutions on large planes with fused multiply-adds
//!   (AVX2 register tiles over zero-padded images), the forward pass and the input
//!   gradient of the training convolutions;
//! * [`stride1`]: the shape and CPU check those two kernels share;
//! * [`weight_grad`]: the weight gradient of stride-1 convolutions on large planes,
//!   computed directly (AVX2 + FMA register tiles over zero-padded images);
//! * [`allocator`]: the settings of mimalloc, the allocator of the `ccnet` binary and
//!   the benches (a call through its C API).

pub mod allocator;
pub mod direct_conv;
pub mod filters;
pub mod gemm;
pub mod stride1;
pub mod weight_grad;

/// Whether this CPU runs the AVX2 + FMA kernels (the image filters, the direct
/// convolution and the weight gradient).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this CPU runs the AVX2 + FMA kernels (never off x86-64).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx2_fma() -> bool {
    false
}
