//! `cargo xtask build-for-budget` end to end at toy scale: generated data, a tiny
//! calibration, a few training steps; the packed model fits, the report states the
//! prediction and the achieved accuracy, and an impossible budget stops before training.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The release `ccnet` beside this test binary (built by the same `cargo test`), or a
/// fresh build of it.
fn ccnet_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = dir.join("ccnet");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "ccnet-host", "--bin", "ccnet"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    assert!(bin.exists(), "{}", bin.display());
    bin
}

fn squares(dir: &Path, n: u32, spots: u32, side: u32) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    let mut state = 7u32 + spots;
    let mut next = |m: u32| {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (state >> 8) % m
    };
    for i in 0..n {
        let boxes: Vec<(u32, u32)> = (0..spots)
            .map(|_| (next(64 - side), next(64 - side)))
            .collect();
        let inside = |x: u32, y: u32| {
            boxes
                .iter()
                .any(|&(bx, by)| x >= bx && x < bx + side && y >= by && y < by + side)
        };
        let img = image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if inside(x, y) {
                190
            } else {
                50 + next(40) as u8
            }])
        });
        let mask = image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if inside(x, y) { 255 } else { 0 }])
        });
        img.save(dir.join(format!("images/s{i:02}.png"))).unwrap();
        mask.save(dir.join(format!("masks/s{i:02}.png"))).unwrap();
    }
}

fn run(bin: &Path, cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(cwd)
        .env("CCNET_BIN", bin)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn builds_a_model_for_a_budget_end_to_end() {
    let bin = ccnet_bin();
    let root = std::env::temp_dir().join(format!("ccnet-bfb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (a, b) = (root.join("a"), root.join("b"));
    squares(&a, 8, 2, 16);
    squares(&b, 8, 10, 5);
    // A toy calibration in the place `ccnet select` looks by default (relative to the
    // working folder).
    let cal = root.join("models").join("calibration").join("unet.json");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let status = Command::new(&bin)
        .args([
            "calibrate",
            "--arch",
            "unet",
            "--datasets",
            &s(&a),
            &s(&b),
            "--alphas",
            "1/16,1/32",
            "--quick",
            "--size",
            "32",
            "--steps",
            "40",
            "--epoch-steps",
            "20",
            "--runs",
            &s(&root.join("cal-runs")),
            "--out",
            &s(&cal),
            "--quiet",
        ])
        .env("RAYON_NUM_THREADS", "2")
        .status()
        .unwrap();
    assert!(status.success());

    let out = root.join("out");
    let (data, out_s) = (s(&a), s(&out));
    let build = [
        "build-for-budget",
        "150KB",
        "--dataset",
        &data,
        "--steps",
        "40",
        "--size",
        "32",
        "--out",
        &out_s,
    ];
    let (ok, stdout, err) = run(&bin, &root, &build);
    assert!(ok, "{err}");
    let model = std::fs::metadata(out.join("model.ccn")).unwrap().len();
    assert!(model <= 150_000, "{model}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["file_bytes"].as_u64(), Some(model));
    assert!(report["achieved"]["f1"].as_f64().is_some(), "{report}");
    assert!(
        report["predicted"]["relative_f1"].as_f64().is_some(),
        "{report}"
    );
    assert!(stdout.contains("achieved F1 / IU"), "{stdout}");
    assert!(out.join("report.md").exists() && out.join("eval").is_dir());

    // Rerunning resumes: training is kept, not repeated. This time the firmware is
    // built around the model and (where QEMU is installed) run on the emulated MCU.
    let (ok, _, err) = run(&bin, &root, &[&build[..], &["--firmware"]].concat());
    assert!(
        ok && err.contains("training already finished (kept)"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let fw = &report["firmware"];
    assert_eq!(fw["model_bytes"].as_u64(), Some(model), "{fw}");
    let flash = fw["flash_bytes"].as_u64().unwrap();
    assert!(
        flash > model && flash <= fw["flash_limit"].as_u64().unwrap(),
        "{fw}"
    );
    assert!(fw["runtime_bytes"].as_u64().unwrap() > 1000, "{fw}");
    let qemu = fw["qemu"].as_str().unwrap();
    if qemu_installed() {
        assert!(qemu.contains("mask equal to the host's"), "{fw}");
    } else {
        eprintln!("qemu-system-arm is not installed: the firmware was built, not run");
    }
    // A flash smaller than the budget is refused before anything runs.
    let (ok, _, err) = run(
        &bin,
        &root,
        &[
            "build-for-budget",
            "150KB",
            "--dataset",
            &s(&a),
            "--out",
            &s(&root.join("noflash")),
            "--firmware",
            "--flash",
            "100KB",
        ],
    );
    assert!(
        !ok && err.contains("cannot fit a flash of 100000 bytes"),
        "{err}"
    );
    assert!(!root.join("noflash").exists());

    // An impossible budget stops at selection, before any training.
    let none = root.join("none");
    let (ok, _, err) = run(
        &bin,
        &root,
        &[
            "build-for-budget",
            "2KB",
            "--dataset",
            &s(&a),
            "--out",
            &s(&none),
        ],
    );
    assert!(
        !ok && err.contains("no width multiplier on the grid meets the constraints"),
        "{err}"
    );
    assert!(!none.join("run").exists());
    // So does a RAM budget no tile's arena can meet.
    let (ok, _, err) = run(
        &bin,
        &root,
        &[
            "build-for-budget",
            "150KB",
            "--ram",
            "1KiB",
            "--dataset",
            &s(&a),
            "--out",
            &s(&none),
        ],
    );
    assert!(!ok && err.contains("> budget 1024 bytes"), "{err}");
    assert!(!none.join("run").exists());
    // The report's arena fits the tile the selection planned for.
    let sel: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("select.json")).unwrap()).unwrap();
    assert_eq!(
        report["tile_arena_bytes"].as_u64(),
        sel["selection"]["chosen"]["ram_bytes"].as_u64(),
        "{report}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

fn qemu_installed() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-arm").is_file()))
        .unwrap_or(false)
}
