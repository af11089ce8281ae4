//! The bad-input matrix: every command that reads user files or values, fed corrupt,
//! truncated, mismatched, foreign, absurd or too-new input. Each case must exit non-zero
//! with a message that names the file (or value) and the problem, must not panic, and
//! must leave no output behind (no result file, no half-started run folder, no temp
//! file). 16-bit and RGBA images are not errors: they are read as `dataset.rs` documents.

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{GrayImage, ImageBuffer, Luma, Rgba, RgbaImage};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccnet-bad-input-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `ccnet`: (success, stdout + stderr). A panic is always a failure.
fn ccnet(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ccnet"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run ccnet");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("panicked"), text)
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

/// A 64×48 gray image with structure and its 0/255 mask.
fn gray(seed: u32) -> GrayImage {
    GrayImage::from_fn(64, 48, |x, y| {
        Luma([((x * 3 + y * 5 + seed * 17) % 200 + 20) as u8])
    })
}

fn mask(w: u32, h: u32, seed: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let (cx, cy) = (20 + seed * 7 % 24, 16 + seed * 5 % 16);
        let d2 = (x as i32 - cx as i32).pow(2) + (y as i32 - cy as i32).pow(2);
        Luma([if d2 < 100 { 255 } else { 0 }])
    })
}

/// A valid dataset of `n` gray 64×48 PNG pairs named `i0`, `i1`, ...
fn dataset(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for i in 0..n {
        gray(i).save(dir.join(format!("images/i{i}.png"))).unwrap();
        mask(64, 48, i)
            .save(dir.join(format!("masks/i{i}.png")))
            .unwrap();
    }
}

fn png_bytes(img: &GrayImage) -> Vec<u8> {
    let mut v = std::io::Cursor::new(Vec::new());
    img.write_to(&mut v, image::ImageFormat::Png).unwrap();
    v.into_inner()
}

fn tiff_bytes(img: &GrayImage) -> Vec<u8> {
    let mut v = std::io::Cursor::new(Vec::new());
    img.write_to(&mut v, image::ImageFormat::Tiff).unwrap();
    v.into_inner()
}

/// Files under `dir` whose names mark an unfinished atomic write.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(temp_files(&p));
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".tmp"))
        {
            out.push(p);
        }
    }
    out
}

/// One row of the matrix.
struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Every one of these must appear in the output (the file and the problem).
    expect: Vec<String>,
    /// None of these may exist afterwards.
    no_output: Vec<PathBuf>,
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    args(&[
        "train",
        "--dataset",
        &s(data),
        "--arch",
        "cumed",
        "--alpha",
        "1/16",
        "--size",
        "32",
        "--steps",
        "2",
        "--epoch-steps",
        "1",
        "--batch",
        "2",
        "--quiet",
        "--out",
        &s(out),
    ])
}

/// A dataset of 3 good pairs in which `i1`'s image or mask is replaced by `bytes`
/// (under `name`, the other file of the pair removed if its name differs).
fn broken(root: &Path, case: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let d = root.join(case);
    dataset(&d, 3);
    let (folder, _) = file.split_once('/').unwrap();
    std::fs::remove_file(d.join(format!("{folder}/i1.png"))).unwrap();
    std::fs::write(d.join(file), bytes).unwrap();
    d
}

#[test]
fn bad_input_matrix() {
    let root = scratch("matrix");
    let mut cases: Vec<Case> = Vec::new();

    // A small finished run, for the cases about run files and packing.
    let good = root.join("good");
    dataset(&good, 4);
    let run = root.join("run");
    let (ok, text) = ccnet(&train_args(&good, &run));
    assert!(ok, "training the fixture run failed: {text}");

    let valid_png = png_bytes(&gray(1));
    let valid_tif = tiff_bytes(&gray(1));

    // ---- images and masks -----------------------------------------------------------
    let mut dataset_case = |name: &'static str, file: &str, bytes: &[u8], problem: &str| {
        let d = broken(&root, name, file, bytes);
        let out = root.join(format!("{name}-run"));
        let stem = file.rsplit('/').next().unwrap().to_string();
        cases.push(Case {
            name,
            args: train_args(&d, &out),
            expect: vec![stem, problem.to_string()],
            no_output: vec![out],
        });
    };
    let mut corrupt_png = valid_png.clone();
    for b in corrupt_png[40..].iter_mut() {
        *b ^= 0x5A;
    }
    dataset_case(
        "corrupt_png",
        "images/i1.png",
        &corrupt_png,
        "cannot read image",
    );
    dataset_case(
        "truncated_png",
        "images/i1.png",
        &valid_png[..valid_png.len() / 2],
        "cannot read image",
    );
    dataset_case(
        "png_header_only",
        "images/i1.png",
        &valid_png[..8],
        "cannot read image",
    );
    let mut corrupt_tif = valid_tif.clone();
    for b in corrupt_tif[4..8].iter_mut() {
        *b = 0xFF;
    }
    dataset_case(
        "corrupt_tiff",
        "images/i1.tif",
        &corrupt_tif,
        "cannot read image",
    );
    dataset_case(
        "truncated_tiff",
        "images/i1.tif",
        &valid_tif[..valid_tif.len() / 2],
        "cannot read image",
    );
    dataset_case("empty_mask_file", "masks/i1.png", &[], "cannot read image");
    dataset_case(
        "mask_size_mismatch",
        "masks/i1.png",
        &png_bytes(&mask(32, 48, 1)),
        "mask is 32x48 but its image",
    );
    let mut grey_mask = mask(64, 48, 1);
    grey_mask.put_pixel(3, 3, Luma([128]));
    dataset_case(
        "non_binary_mask",
        "masks/i1.png",
        &png_bytes(&grey_mask),
        "mask is not binary (found value 128",
    );
    dataset_case(
        "text_file_as_image",
        "images/i1.png",
        b"this is not an image\n",
        "cannot read image",
    );

    // Float TIFF images are refused (dataset.rs: floating-point images are refused).
    {
        let d = root.join("float_tiff");
        dataset(&d, 3);
        std::fs::remove_file(d.join("images/i1.png")).unwrap();
        let f: ImageBuffer<image::Rgb<f32>, Vec<f32>> =
            ImageBuffer::from_fn(64, 48, |x, _| image::Rgb([x as f32 / 64.0; 3]));
        image::DynamicImage::ImageRgb32F(f)
            .save(d.join("images/i1.tif"))
            .unwrap();
        let out = root.join("float_tiff-out.json");
        cases.push(Case {
            name: "float_tiff",
            args: args(&["complexity", &s(&d), "--out", &s(&out)]),
            expect: vec!["i1.tif".into(), "unsupported pixel format".into()],
            no_output: vec![out],
        });
    }

    // The same kind of damage through `ccnet complexity`, whose report must not appear.
    {
        let d = broken(
            &root,
            "complexity_truncated",
            "images/i1.png",
            &valid_png[..100],
        );
        let out = root.join("complexity_truncated.json");
        let plot = root.join("complexity_truncated.png");
        cases.push(Case {
            name: "complexity_truncated_png",
            args: args(&["complexity", &s(&d), "--out", &s(&out), "--plot", &s(&plot)]),
            expect: vec!["i1.png".into(), "cannot read image".into()],
            no_output: vec![out, plot],
        });
    }

    // ---- datasets ---------------------------------------------------------------------
    {
        let d = root.join("empty");
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::create_dir_all(d.join("masks")).unwrap();
        let out = root.join("empty-run");
        cases.push(Case {
            name: "empty_dataset",
            args: train_args(&d, &out),
            expect: vec!["empty".into(), "no images found".into()],
            no_output: vec![out],
        });
        let out = root.join("missing-run");
        let missing = root.join("no_such_folder_here");
        cases.push(Case {
            name: "missing_dataset",
            args: train_args(&missing, &out),
            expect: vec!["no_such_folder_here".into()],
            no_output: vec![out],
        });
    }

    // ---- values -----------------------------------------------------------------------
    let out = root.join("values-run");
    let mut with = |name: &'static str, flag: &str, value: &str, expect: &[&str]| {
        let mut a = train_args(&good, &out);
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = value.to_string();
        cases.push(Case {
            name,
            args: a,
            expect: expect.iter().map(|e| e.to_string()).collect(),
            no_output: vec![out.clone()],
        });
    };
    with("unknown_arch", "--arch", "resnet", &["`resnet`"]);
    with("size_zero", "--size", "0", &["`0`", "expected a size"]);
    with(
        "size_absurd",
        "--size",
        "4294967295x4294967295",
        &["--size", "multiple of 8"],
    );
    with("alpha_zero", "--alpha", "0", &["`0`"]);
    cases.push(Case {
        name: "arch_unknown",
        args: args(&["arch", "vgg"]),
        expect: vec!["`vgg`".into()],
        no_output: vec![],
    });

    // ---- budgets ----------------------------------------------------------------------
    let packed = root.join("model.ccn");
    cases.push(Case {
        name: "budget_malformed",
        args: args(&[
            "pack",
            "--run",
            &s(&run),
            "--budget",
            "12QB",
            "--out",
            &s(&packed),
        ]),
        expect: vec!["`12QB`".into()],
        no_output: vec![packed.clone()],
    });
    cases.push(Case {
        name: "budget_negative",
        args: args(&[
            "pack",
            "--run",
            &s(&run),
            "--budget=-1MB",
            "--out",
            &s(&packed),
        ]),
        expect: vec!["`-1MB`".into()],
        no_output: vec![packed.clone()],
    });
    cases.push(Case {
        name: "budget_too_small",
        args: args(&[
            "pack",
            "--run",
            &s(&run),
            "--quant",
            "f32",
            "--budget",
            "100",
            "--out",
            &s(&packed),
        ]),
        expect: vec!["100".into(), "budget".into()],
        no_output: vec![packed.clone()],
    });

    // ---- run files (what eval, pack and --resume read) --------------------------------
    let weights = std::fs::read(run.join("weights.safetensors")).unwrap();
    let checkpoint = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    let mut run_case =
        |name: &'static str, file: &str, bytes: Vec<u8>, cmd: &str, problem: &[&str]| {
            let r = root.join(format!("{name}-run"));
            std::fs::create_dir_all(&r).unwrap();
            for f in [
                "config.json",
                "weights.safetensors",
                "checkpoint.safetensors",
            ] {
                std::fs::copy(run.join(f), r.join(f)).unwrap();
            }
            std::fs::write(r.join(file), bytes).unwrap();
            let out = root.join(format!("{name}-out"));
            let a = match cmd {
                "eval" => args(&[
                    "eval",
                    "--run",
                    &s(&r),
                    "--dataset",
                    &s(&good),
                    "--out",
                    &s(&out),
                ]),
                "pack" => args(&["pack", "--run", &s(&r), "--quant", "f32", "--out", &s(&out)]),
                _ => args(&["train", "--resume", "--quiet", "--out", &s(&r)]),
            };
            let mut expect = vec![file.to_string()];
            expect.extend(problem.iter().map(|p| p.to_string()));
            cases.push(Case {
                name,
                args: a,
                expect,
                no_output: if cmd == "train" {
                    vec![r.join("metrics.json")]
                } else {
                    vec![out]
                },
            });
        };
    run_case(
        "weights_truncated_eval",
        "weights.safetensors",
        weights[..weights.len() / 2].to_vec(),
        "eval",
        &[],
    );
    let mut flipped = weights.clone();
    flipped[8..40].fill(b'#');
    run_case(
        "weights_corrupted_pack",
        "weights.safetensors",
        flipped,
        "pack",
        &[],
    );
    run_case(
        "weights_foreign_eval",
        "weights.safetensors",
        valid_png.clone(),
        "eval",
        &[],
    );
    run_case(
        "checkpoint_truncated_resume",
        "checkpoint.safetensors",
        checkpoint[..checkpoint.len() / 3].to_vec(),
        "train",
        &[],
    );
    let newer = config.replacen("\"format\": 1", "\"format\": 99", 1);
    assert_ne!(newer, config, "config.json has no `\"format\": 1` field");
    run_case(
        "run_format_newer_eval",
        "config.json",
        newer.clone().into_bytes(),
        "eval",
        &["run format 99"],
    );
    run_case(
        "run_format_newer_pack",
        "config.json",
        newer.into_bytes(),
        "pack",
        &["run format 99"],
    );
    run_case(
        "config_not_json_eval",
        "config.json",
        b"{ not json".to_vec(),
        "eval",
        &["invalid"],
    );

    // ---- packed model files (what eval --model and segment read) ----------------------
    let model = root.join("fixture.ccn");
    let (ok, text) = ccnet(&args(&[
        "pack",
        "--run",
        &s(&run),
        "--quant",
        "f32",
        "--out",
        &s(&model),
    ]));
    assert!(ok, "packing the fixture run failed: {text}");
    let mbytes = std::fs::read(&model).unwrap();
    let mut newer = mbytes.clone();
    newer[4..6].copy_from_slice(&2u16.to_le_bytes());
    let end = newer.len() - ccnet_shared::format::CRC_LEN;
    let crc = ccnet_shared::format::CRC32.checksum(&newer[..end]);
    newer[end..].copy_from_slice(&crc.to_le_bytes());
    let mut flipped = mbytes.clone();
    flipped[mbytes.len() / 2] ^= 0x10;
    let models: [(&'static str, &'static str, Vec<u8>, &str); 4] = [
        (
            "model_truncated",
            "trunc.ccn",
            mbytes[..mbytes.len() / 2].to_vec(),
            "trunc.ccn",
        ),
        ("model_corrupted", "flip.ccn", flipped, "flip.ccn"),
        ("model_foreign", "photo.ccn", valid_png.clone(), "photo.ccn"),
        (
            "model_newer_version",
            "v2.ccn",
            newer,
            "format version 2 is not supported",
        ),
    ];
    for (i, (name, file, bytes, problem)) in models.into_iter().enumerate() {
        let p = root.join(file);
        std::fs::write(&p, bytes).unwrap();
        let out = root.join(format!("{name}-out"));
        let a = if i % 2 == 0 {
            args(&[
                "eval",
                "--model",
                &s(&p),
                "--dataset",
                &s(&good),
                "--out",
                &s(&out),
            ])
        } else {
            args(&[
                "segment",
                "--model",
                &s(&p),
                "--out",
                &s(&out),
                &s(&good.join("images/i0.png")),
            ])
        };
        cases.push(Case {
            name,
            args: a,
            expect: vec![file.to_string(), problem.to_string()],
            no_output: vec![out],
        });
    }

    // ---- run the matrix ---------------------------------------------------------------
    assert!(cases.len() >= 20, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let (ok, text) = ccnet(&c.args);
        let mut why = Vec::new();
        if ok {
            why.push("succeeded".to_string());
        }
        if text.contains("panicked") {
            why.push("panicked".to_string());
        }
        for e in &c.expect {
            if !text.contains(e.as_str()) {
                why.push(format!("message lacks {e:?}"));
            }
        }
        for p in &c.no_output {
            if p.exists() {
                why.push(format!("left {}", p.display()));
            }
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {}\n    {}",
                c.name,
                why.join(", "),
                text.trim()
            ));
        }
    }
    let temps = temp_files(&root);
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// 16-bit and RGBA images are read as `dataset.rs` documents (16-bit stretched to 8 bits,
/// alpha dropped), and so are 16-bit masks of 0 and 65535... only if documented: masks
/// accept 0 and 255 only, so a 16-bit mask of 0/255 values works.
#[test]
fn sixteen_bit_and_rgba_images_work() {
    let root = scratch("works");
    let d16 = root.join("d16");
    dataset(&d16, 3);
    for i in 0..3 {
        std::fs::remove_file(d16.join(format!("images/i{i}.png"))).unwrap();
        let img: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(64, 48, |x, y| Luma([(x * 700 + y * 300 + i * 50) as u16]));
        img.save(d16.join(format!("images/i{i}.tif"))).unwrap();
    }
    let drgba = root.join("drgba");
    dataset(&drgba, 3);
    for i in 0..3 {
        let img = RgbaImage::from_fn(64, 48, |x, y| {
            Rgba([(x * 4) as u8, (y * 5) as u8, (i * 60) as u8, (x + y) as u8])
        });
        img.save(drgba.join(format!("images/i{i}.png"))).unwrap();
    }
    let report = root.join("report.json");
    let (ok, text) = ccnet(&args(&[
        "complexity",
        &s(&d16),
        &s(&drgba),
        "--out",
        &s(&report),
    ]));
    assert!(ok, "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let text = v.to_string();
    assert!(text.contains("d16") && text.contains("drgba"), "{text}");
    for (d, channels) in [(&d16, 1), (&drgba, 3)] {
        let run = root.join(format!("{}-run", d.file_name().unwrap().to_str().unwrap()));
        let (ok, text) = ccnet(&train_args(d, &run));
        assert!(ok, "{text}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["in_channels"], channels, "{}", d.display());
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Model files from `ccnet pack`, damaged: the device engine rejects each with the
/// specific error (no command reads `.ccn` files back; the engine does, on the device).
#[test]
fn damaged_packed_models_are_rejected() {
    use ccnet_device::{DeviceError, Model};
    use ccnet_shared::format::{FormatError, CRC32, CRC_LEN};

    let root = scratch("models");
    let data = root.join("data");
    dataset(&data, 4);
    let run = root.join("run");
    let (ok, text) = ccnet(&train_args(&data, &run));
    assert!(ok, "{text}");
    let packed = root.join("m.ccn");
    let (ok, text) = ccnet(&args(&[
        "pack",
        "--run",
        &s(&run),
        "--quant",
        "f16",
        "--out",
        &s(&packed),
    ]));
    assert!(ok, "{text}");
    let bytes = std::fs::read(&packed).unwrap();
    let aligned = |b: &[u8]| {
        let mut w = vec![0u128; b.len().div_ceil(16)];
        let v: &mut [u8] = bytemuck::cast_slice_mut(&mut w);
        v[..b.len()].copy_from_slice(b);
        (w, b.len())
    };
    let parse = |b: &[u8]| {
        let (w, n) = aligned(b);
        let v: &[u8] = bytemuck::cast_slice(&w);
        Model::parse(&v[..n])
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    };
    assert_eq!(parse(&bytes), Ok(()));

    let reseal = |b: &mut Vec<u8>| {
        let end = b.len() - CRC_LEN;
        let crc = CRC32.checksum(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
    };
    // A newer format version (resealed, so only the version is wrong).
    let mut newer = bytes.clone();
    newer[4..6].copy_from_slice(&2u16.to_le_bytes());
    reseal(&mut newer);
    let e = parse(&newer).unwrap_err();
    let expected = format!(
        "{:?}",
        DeviceError::from(FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    );
    assert_eq!(e, expected);
    // Truncated at every 97th length, one corrupted byte, a foreign file.
    for n in (0..bytes.len()).step_by(97) {
        assert!(parse(&bytes[..n]).is_err(), "truncated at {n} accepted");
    }
    let mut flipped = bytes.clone();
    let mid = bytes.len() / 2;
    flipped[mid] ^= 0x10;
    assert!(parse(&flipped).unwrap_err().contains("CrcMismatch"));
    let foreign = png_bytes(&gray(0));
    assert!(parse(&foreign).unwrap_err().contains("BadMagic"));
    let _ = std::fs::remove_dir_all(&root);
}
