//! Plumbing shared by the executor's own CPU ops (convolutions, batch norm, max-pool):
//! reading a tensor's `f32` data in place, and sizing rayon tasks.

use candle_core::{CpuStorage, Layout, Tensor};

/// Minimum elements per rayon task, so tiny layers do not drown in scheduling.
pub const MIN_TASK: usize = 1 << 14;

/// The `with_min_len` for parallel work over items of `item` elements each: tasks of
/// at least [`MIN_TASK`] elements.
pub fn min_items(item: usize) -> usize {
    (MIN_TASK / item.max(1)).max(1)
}

/// The `f32` data of a custom op's argument; `what` names it in the error when the
/// layout is not contiguous.
pub fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Runs `f` on the `f32` data of a contiguous CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("a CPU op's tensor must be contiguous");
    };
    match &*st {
        candle_core::Storage::Cpu(c) => Ok(f(&c.as_slice::<f32>()?[a..b])),
        _ => candle_core::bail!("the executor's own ops take CPU tensors only"),
    }
}
