//! The compression commands end to end on generated data: `ccnet calibrate` (quick
//! sweep, resumable, status), `ccnet select` (budgets and infeasible constraints) and
//! `ccnet pack` (int8 within a budget, verified with the device engine; refusal leaves
//! no file). Run in release mode: it trains four tiny networks.

mod common;

use common::ccnet;

use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccnet-compress-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` gray 64×48 images: a smooth background with `spots` bright squares of side
/// `side` (the foreground), placed by a fixed linear congruential sequence.
fn squares_dataset(dir: &Path, n: u32, spots: u32, side: u32) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    let mut state = 12345u32 + spots;
    let mut next = |m: u32| {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (state >> 8) % m
    };
    for i in 0..n {
        let (w, h) = (64, 48);
        let boxes: Vec<(u32, u32)> = (0..spots)
            .map(|_| (next(w - side), next(h - side)))
            .collect();
        let inside = |x: u32, y: u32| {
            boxes
                .iter()
                .any(|&(bx, by)| x >= bx && x < bx + side && y >= by && y < by + side)
        };
        let img = image::GrayImage::from_fn(w, h, |x, y| {
            let base = 60 + (x + y) / 2 + next(30);
            image::Luma([if inside(x, y) { 200 } else { base as u8 }])
        });
        let mask = image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if inside(x, y) { 255 } else { 0 }])
        });
        img.save(dir.join(format!("images/i{i:02}.png"))).unwrap();
        mask.save(dir.join(format!("masks/i{i:02}.png"))).unwrap();
    }
}

#[test]
fn calibrate_select_and_pack_on_generated_data() {
    let root = scratch("all");
    let (a, b) = (root.join("large"), root.join("small"));
    squares_dataset(&a, 8, 2, 14);
    squares_dataset(&b, 8, 12, 4);
    let runs = root.join("runs");
    let cal = root.join("cal").join("unet.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let sweep: Vec<String> = [
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
        "60",
        "--epoch-steps",
        "30",
        "--runs",
        &s(&runs),
        "--out",
        &s(&cal),
        "--quiet",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let args: Vec<&str> = sweep.iter().map(String::as_str).collect();
    let (ok, out, err) = ccnet(&args);
    assert!(ok, "calibrate failed: {err}");
    assert!(out.contains("m_F1 ="), "{out}");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert_eq!(file["arch"], "unet");
    assert_eq!(file["base_alpha"], "1/16");
    assert_eq!(file["datasets"].as_array().unwrap().len(), 2);
    for d in file["datasets"].as_array().unwrap() {
        assert_eq!(d["points"].as_array().unwrap().len(), 2, "{d}");
        assert!(d["f1"]["m"].as_f64().is_some(), "{d}");
        assert!(d["j"].as_f64().unwrap() > 0.0);
    }
    for plot in ["unet-f1.png", "unet-iu.png", "unet-slopes.png"] {
        let p = cal.with_file_name(plot);
        assert!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "{}",
            p.display()
        );
    }
    // Rerunning trains nothing; status lists every key as done.
    let (ok, _, err) = ccnet(&args);
    assert!(ok && err.contains("4 finished, 0 to train"), "{err}");
    let mut status = args.clone();
    status.push("--status");
    let (ok, out, _) = ccnet(&status);
    assert!(ok);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("done")).count(),
        4,
        "{out}"
    );

    // A per-dataset downscale is part of the folder's settings; an unknown name is refused.
    for (spec, says) in [
        ("small=2", ["per-dataset downscale", "small"]),
        ("nosuch=2", ["`nosuch`", "large"]),
    ] {
        let mut refused = args.clone();
        refused.extend(["--downscale", spec, "--status"]);
        let (ok, _, err) = ccnet(&refused);
        assert!(!ok && says.iter().all(|w| err.contains(w)), "{spec}: {err}");
    }

    // Selection under a disk budget picks the largest α that fits.
    let (ok, out, err) = ccnet(&[
        "select",
        "--dataset",
        &s(&a),
        "--arch",
        "unet",
        "--calibration",
        &s(&cal),
        "--disk",
        "40KB",
        "--bits",
        "8",
        "--alphas",
        "1/8,1/16,1/32,1/64",
        "--json",
    ]);
    assert!(ok, "{err}");
    let sel: serde_json::Value = serde_json::from_str(&out).unwrap();
    let chosen = &sel["selection"]["chosen"];
    assert!(chosen["disk_bytes"].as_u64().unwrap() <= 40_000);
    let bigger_fits = sel["selection"]["grid"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| {
            c["params"].as_u64() > chosen["params"].as_u64()
                && c["disk_bytes"].as_u64().unwrap() <= 40_000
        });
    assert!(!bigger_fits, "{out}");
    let (ok, _, err) = ccnet(&[
        "select",
        "--dataset",
        &s(&a),
        "--calibration",
        &s(&cal),
        "--disk",
        "1KB",
        "--alphas",
        "1/16,1/32",
    ]);
    assert!(
        !ok && err.contains("no width multiplier on the grid")
            && err.contains("> disk budget 1000 bytes"),
        "{err}"
    );

    // Packing: int8 within a budget, verified on the run's validation images.
    let run = runs.join("unet.large.a1_16.s0");
    let model = root.join("model.ccn");
    let (ok, out, err) = ccnet(&[
        "pack",
        "--run",
        &s(&run),
        "--quant",
        "int8",
        "--budget",
        "200KB",
        "--verify",
        "--out",
        &s(&model),
        "--json",
    ]);
    assert!(ok, "{err}");
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    let len = std::fs::metadata(&model).unwrap().len();
    assert_eq!(rep["file_bytes"].as_u64(), Some(len));
    assert!(len <= 200_000);
    assert!(rep["verify"]["mean"]["f1"].as_f64().is_some(), "{out}");
    // What will be flashed, evaluated and used offline with the device engine.
    let (ok, out, err) = ccnet(&["eval", "--model", &s(&model), "--dataset", &s(&a), "--json"]);
    assert!(ok, "{err}");
    let ev: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ev["per_image"].as_array().unwrap().len(), 8);
    let seg = root.join("seg");
    let image = a.join("images").join("i00.png");
    let (ok, _, err) = ccnet(&[
        "segment",
        "--model",
        &s(&model),
        &s(&image),
        "--out",
        &s(&seg),
    ]);
    assert!(ok, "{err}");
    let mask = image::open(seg.join("i00_mask.png")).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (64, 48));
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
    assert!(seg.join("i00_overlay.png").exists());
    let bogus = root.join("bogus.ccn");
    std::fs::write(&bogus, b"not a model").unwrap();
    let (ok, _, err) = ccnet(&[
        "segment",
        "--model",
        &s(&bogus),
        &s(&image),
        "--out",
        &s(&seg),
    ]);
    assert!(
        !ok && err.contains("bogus.ccn") && err.contains("bad magic number"),
        "{err}"
    );
    // A budget that cannot be met is refused with the numbers, and writes nothing.
    let refused = root.join("refused.ccn");
    let (ok, _, err) = ccnet(&[
        "pack",
        "--run",
        &s(&run),
        "--quant",
        "f32",
        "--budget",
        "1KB",
        "--out",
        &s(&refused),
    ]);
    assert!(
        !ok && err.contains("over the budget of 1000 bytes")
            && err.contains("parameters at 32 bits"),
        "{err}"
    );
    assert!(!refused.exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// `ccnet validate` on the shipped U-Net calibration: one leave-one-out row per
/// calibrated dataset and one case-1 check per dataset and target; a calibration of
/// two datasets cannot be validated and says why.
#[test]
fn validate_runs_leave_one_out_on_the_shipped_calibration() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/calibration/unet.json");
    let cal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    let n = cal["datasets"].as_array().unwrap().len();
    let (ok, out, err) = ccnet(&[
        "validate",
        "--calibration",
        shipped.to_str().unwrap(),
        "--targets",
        "0.9,0.95,0.99",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["leave_one_out"].as_array().unwrap();
    assert_eq!(rows.len(), n);
    assert_eq!(v["case1"].as_array().unwrap().len(), 3 * n);
    for r in rows {
        let pts = r["points"].as_array().unwrap();
        assert!(!pts.is_empty(), "{r}");
        for p in pts {
            let pred = p["predicted"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&pred), "{p}");
        }
    }
    // Markdown by default.
    let (ok, out, _) = ccnet(&["validate", "--calibration", shipped.to_str().unwrap()]);
    assert!(ok && out.contains("| held-out dataset |") && out.contains("Case 1 holds"));
    // Bad targets and too few datasets are clear errors.
    let (ok, _, err) = ccnet(&[
        "validate",
        "--calibration",
        shipped.to_str().unwrap(),
        "--targets",
        "1.5",
    ]);
    assert!(!ok && err.contains("--targets"), "{err}");
    let root = scratch("validate");
    let mut two = cal.clone();
    two["datasets"] = serde_json::Value::Array(cal["datasets"].as_array().unwrap()[..2].to_vec());
    let small = root.join("two.json");
    std::fs::write(&small, serde_json::to_string(&two).unwrap()).unwrap();
    let (ok, _, err) = ccnet(&["validate", "--calibration", small.to_str().unwrap()]);
    assert!(
        !ok && err.contains("at least 3 calibrated datasets"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
