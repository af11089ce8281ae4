//! The `ccnet` binary.

/// mimalloc keeps freed large buffers for reuse (with purging off, see `main`); glibc's
/// allocator hands them back to the kernel, so every training step paid its page faults
/// again (`docs/training.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Keep freed buffers in the process: each training step reuses them.
    ccnet_host::kernels::allocator::keep_freed_memory();
    // candle's pool for element-wise operations spin-waits on a barrier; with other work
    // on the cores it wastes them (training steps 2.5× slower on a loaded 2-core machine,
    // a few percent on an idle one; matrix products and our convolutions use rayon and
    // are unaffected). One thread there is the default unless the user sets it; this runs
    // before any other thread exists.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    ccnet_host::cli::main()
}
