//! Settings of mimalloc, the global allocator of the `ccnet` binary and of the training
//! benches.
//!
//! mimalloc hands freed memory back to the OS ("purges" it) a while after it is freed
//! (1 s by default in mimalloc 3). A training step on large planes frees and reallocates
//! hundreds of megabytes of activations and gradients every step, and a step lasts about
//! as long as that delay, so every step faulted its buffers in again and the kernel
//! zeroed them (up to 17 % of the CPU time of an α = 1/4, 256² step, see
//! `docs/training.md`). [`keep_freed_memory`] turns purging off: the process keeps its
//! peak footprint, which a training run reaches in its first step anyway.

use std::os::raw::c_int;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (`mimalloc.h`, versions 2 and 3;
/// `libmimalloc-sys` does not name it): milliseconds before freed memory is purged,
/// −1 for never.
const PURGE_DELAY: c_int = 15;

/// Tells mimalloc never to hand freed memory back to the OS (see the module note). Only
/// has an effect where mimalloc is the global allocator; call it first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores the value in mimalloc's option table (an atomic
    // store); any option index and value are accepted, and mimalloc reads the purge delay
    // afresh each time it schedules a purge.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mimalloc's current purge delay in milliseconds (−1: never).
    fn purge_delay() -> std::os::raw::c_long {
        // SAFETY: `mi_option_get` reads the option table (initialising it from the
        // environment on first use); it takes any option index.
        unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
    }

    #[test]
    fn purge_delay_is_the_option_that_keep_freed_memory_turns_off() {
        // The index names the purge delay: mimalloc 3's default is 1000 ms (a neighbour
        // option would read 0 or 1), unless the environment overrides it.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay(), 1000);
        }
        keep_freed_memory();
        assert_eq!(purge_delay(), -1);
    }
}
