//! Puts `memory.x` on the linker search path, links with cortex-m-rt's `link.x`, and
//! checks that the fixture directory is set.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    // cortex-m-rt's linker script (here rather than in rustflags, which RUSTFLAGS overrides).
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-env-changed=CCNET_FIXTURE_DIR");
    if env::var_os("CCNET_FIXTURE_DIR").is_none() {
        panic!("CCNET_FIXTURE_DIR is not set: build this firmware with `cargo xtask qemu`");
    }
}
