//! Helpers shared by the integration tests that run `ccnet` on generated data.

// Each test file uses some of the helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{GrayImage, Luma};

pub mod tensors;
pub mod tiny_unet;

/// A fresh, empty scratch folder `<tmp>/ccnet-<group>-<name>-<pid>`.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccnet-{group}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A path as an owned string (test paths are UTF-8).
pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `n` generated 64×48 gray images with a bright disc and its 0/255 mask; `seed`
/// moves the discs.
pub fn disc_dataset(dir: &Path, n: u32, seed: u32) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for i in 0..n {
        let (cx, cy, r) = (
            (12 + (i * 13 + seed * 7) % 40) as i32,
            (12 + (i * 7 + seed * 5) % 24) as i32,
            (6 + (i + seed) % 5) as i32,
        );
        let inside = |x: u32, y: u32| (x as i32 - cx).pow(2) + (y as i32 - cy).pow(2) < r * r;
        GrayImage::from_fn(64, 48, |x, y| {
            let noise = ((x * 31 + y * 17 + i * 101) % 23) as u8;
            Luma([if inside(x, y) {
                180 + noise
            } else {
                40 + noise
            }])
        })
        .save(dir.join(format!("images/p{i}.png")))
        .unwrap();
        GrayImage::from_fn(64, 48, |x, y| Luma([if inside(x, y) { 255 } else { 0 }]))
            .save(dir.join(format!("masks/p{i}.png")))
            .unwrap();
    }
}

/// Runs the `ccnet` binary with two worker threads: (success, stdout, stderr).
pub fn ccnet(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ccnet"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("ccnet runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
