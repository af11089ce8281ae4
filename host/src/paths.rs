//! The one setting that locates the real datasets.
//!
//! `CCNET_DATASETS` if set, else `../shared/datasets` beside the repository checkout.

use std::path::PathBuf;

/// Environment variable that overrides where the real datasets live.
pub const DATASETS_ENV: &str = "CCNET_DATASETS";

/// The folder holding the real datasets (each `NAME/images` + `NAME/masks`).
pub fn datasets_root() -> PathBuf {
    match std::env::var_os(DATASETS_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("..")
            .join("shared")
            .join("datasets"),
    }
}

/// The folder of one real dataset, or a message saying clearly where it was looked for.
pub fn dataset(name: &str) -> Result<PathBuf, String> {
    let root = datasets_root();
    let dir = root.join(name);
    if dir.join("images").is_dir() {
        Ok(dir)
    } else {
        Err(format!(
            "real dataset `{name}` not found at {} (set {DATASETS_ENV} to the folder holding the datasets)",
            dir.display()
        ))
    }
}
