//! `ccnet train` / `ccnet eval` on bad input: clear errors naming the problem, no panic.

use std::path::PathBuf;
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccnet-train-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ccnet(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ccnet"))
        .args(args)
        .output()
        .expect("run ccnet");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

fn write_pair(dir: &std::path::Path, id: &str, with_mask: bool) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([(x * 8) as u8]))
        .save(dir.join(format!("images/{id}.png")))
        .unwrap();
    if with_mask {
        image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x > 16 { 255 } else { 0 }]))
            .save(dir.join(format!("masks/{id}.png")))
            .unwrap();
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let root = scratch("bad");
    let out = root.join("run");
    let out_s = out.to_str().unwrap();

    // Empty dataset folder.
    let empty = root.join("empty");
    std::fs::create_dir_all(empty.join("images")).unwrap();
    std::fs::create_dir_all(empty.join("masks")).unwrap();
    let (ok, text) = ccnet(&[
        "train",
        "--dataset",
        empty.to_str().unwrap(),
        "--out",
        out_s,
        "--quiet",
    ]);
    assert!(!ok && text.contains("no images found"), "{text}");

    // A mask is missing.
    let missing = root.join("missing");
    write_pair(&missing, "a", true);
    write_pair(&missing, "b", false);
    let (ok, text) = ccnet(&[
        "train",
        "--dataset",
        missing.to_str().unwrap(),
        "--out",
        out_s,
    ]);
    assert!(
        !ok && text.contains("b.png") && text.contains("no mask"),
        "{text}"
    );

    // No masks/ folder at all.
    let nomasks = root.join("nomasks");
    std::fs::create_dir_all(nomasks.join("images")).unwrap();
    write_pair(&nomasks, "a", false);
    std::fs::remove_dir_all(nomasks.join("masks")).unwrap();
    let (ok, text) = ccnet(&[
        "train",
        "--dataset",
        nomasks.to_str().unwrap(),
        "--out",
        out_s,
    ]);
    assert!(!ok && text.contains("no masks/ folder"), "{text}");

    // A single image cannot be split.
    let one = root.join("one");
    write_pair(&one, "a", true);
    let (ok, text) = ccnet(&["train", "--dataset", one.to_str().unwrap(), "--out", out_s]);
    assert!(!ok && text.contains("at least 2"), "{text}");

    // A mask that is not binary: the error names the mask.
    let gray = root.join("gray");
    write_pair(&gray, "a", true);
    write_pair(&gray, "b", true);
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([x as u8]))
        .save(gray.join("masks/b.png"))
        .unwrap();
    let (ok, text) = ccnet(&["train", "--dataset", gray.to_str().unwrap(), "--out", out_s]);
    assert!(
        !ok && text.contains("b.png") && text.contains("not binary"),
        "{text}"
    );

    // Unsupported α, bad size, unknown dataset name.
    let good = root.join("good");
    write_pair(&good, "a", true);
    write_pair(&good, "b", true);
    let g = good.to_str().unwrap();
    let (ok, text) = ccnet(&["train", "--dataset", g, "--alpha", "3/2", "--out", out_s]);
    assert!(!ok && text.contains("`3/2`"), "{text}");
    let (ok, text) = ccnet(&["train", "--dataset", g, "--size", "40", "--out", out_s]);
    assert!(!ok && text.contains("multiple of 16"), "{text}");
    let (ok, text) = ccnet(&["train", "--dataset", "no_such_dataset_xyz", "--out", out_s]);
    assert!(!ok && text.contains("no_such_dataset_xyz"), "{text}");

    // --device cuda without the feature.
    if !cfg!(feature = "cuda") {
        let (ok, text) = ccnet(&["train", "--dataset", g, "--device", "cuda", "--out", out_s]);
        assert!(!ok && text.contains("without CUDA support"), "{text}");
    }

    // Resume / eval of a folder that holds no run.
    let (ok, text) = ccnet(&["train", "--resume", "--out", out_s]);
    assert!(!ok && text.contains("config.json"), "{text}");
    let (ok, text) = ccnet(&["eval", "--run", out_s, "--dataset", g]);
    assert!(!ok && text.contains("config.json"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn train_then_eval_through_the_command_line() {
    let root = scratch("e2e");
    let data = root.join("data");
    for id in ["a", "b", "c", "d"] {
        write_pair(&data, id, true);
    }
    let d = data.to_str().unwrap();
    let run = root.join("run");
    let r = run.to_str().unwrap();
    let (ok, text) = ccnet(&[
        "train",
        "--dataset",
        d,
        "--arch",
        "cumed",
        "--alpha",
        "1/16",
        "--size",
        "32",
        "--steps",
        "4",
        "--epoch-steps",
        "2",
        "--batch",
        "2",
        "--downscale",
        "2",
        "--out",
        r,
        "--quiet",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("best epoch"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["arch"], "cumed");
    assert_eq!(cfg["alpha"], "1/16");
    assert_eq!(cfg["batch_norm"], true);
    let (ok, text) = ccnet(&[
        "eval",
        "--run",
        r,
        "--dataset",
        d,
        "--json",
        "--overlays",
        "1",
    ]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["images"], "val");
    assert_eq!(v["per_image"].as_array().unwrap().len(), 1);
    // Metrics and overlays are at full resolution although the network ran at half.
    assert_eq!(v["per_image"][0]["width"], 32);
    let overlay = v["overlays"][0].as_str().unwrap();
    assert_eq!(image::open(overlay).unwrap().width(), 3 * 32);
    let f1 = v["mean"]["f1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f1));
    let _ = std::fs::remove_dir_all(&root);
}
