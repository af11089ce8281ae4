//! `cargo xtask build-for-budget BUDGET`: not implemented yet.

/// Runs the task.
pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(b) = args.first() {
        if !b.starts_with('-') {
            ccnet_shared::budget::parse_bytes(b).map_err(|e| format!("`{b}`: {e}"))?;
        }
    }
    Err(
        "`cargo xtask build-for-budget` is not implemented yet: it needs complexity, \
         calibration, training, packing and the device engine"
            .to_string(),
    )
}
