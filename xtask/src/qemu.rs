//! `cargo xtask qemu`: not implemented yet.

/// Runs the task.
pub fn run(_args: &[String]) -> Result<(), String> {
    Err("`cargo xtask qemu` is not implemented yet".to_string())
}
