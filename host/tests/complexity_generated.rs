//! Complexity measures on generated images whose answer is known, through the public
//! library API and the `ccnet complexity` command.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ccnet_host::complexity::{
    self, measure_dataset, measure_image, BlobSettings, Polarity, Report, Settings,
};
use ccnet_host::dataset::{Dataset, Image8};
use image::{GrayImage, Luma, RgbImage};

fn gray(w: u32, h: u32, mut f: impl FnMut(u32, u32) -> f32) -> Image8 {
    let mut data = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            data.push((f(x, y).clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    Image8 {
        width: w,
        height: h,
        channels: 1,
        data,
    }
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Gaussian spots at jittered grid positions with sizes between 2.5 and 6 px.
fn spots(n_side: u32, spacing: u32, seed: u64, bright: bool) -> (Image8, usize) {
    let mut rng = Lcg(seed);
    let mut centres = Vec::new();
    for gy in 0..n_side {
        for gx in 0..n_side {
            let cx = spacing as f32 * (gx as f32 + 0.5) + (rng.next() - 0.5) * 12.0;
            let cy = spacing as f32 * (gy as f32 + 0.5) + (rng.next() - 0.5) * 12.0;
            let s = 2.5 + 3.5 * rng.next();
            let a = 0.5 + 0.3 * rng.next();
            centres.push((cx, cy, s, a));
        }
    }
    let side = n_side * spacing;
    let img = gray(side, side, |x, y| {
        let mut v = 0.0;
        for &(cx, cy, s, a) in &centres {
            let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
            v += a * (-d2 / (2.0 * s * s)).exp();
        }
        if bright {
            0.15 + v
        } else {
            0.9 - v
        }
    });
    (img, centres.len())
}

#[test]
fn n_separated_spots_give_n_blobs() {
    let s = Settings::default();
    for (seed, bright) in [(1, true), (2, false), (3, true)] {
        let (img, n) = spots(6, 56, seed, bright);
        let (_, blobs, keypoints) = measure_image(&img, &s).unwrap();
        let tol = (n as f64 * 0.1).ceil() as usize;
        assert!(
            blobs.abs_diff(n) <= tol,
            "seed {seed}: {blobs} blobs for {n} spots"
        );
        assert!(
            keypoints.abs_diff(n) <= tol,
            "seed {seed}: {keypoints} key points for {n} spots"
        );
    }
}

#[test]
fn flat_image_has_near_minimal_j_and_no_blobs() {
    let s = Settings::default();
    let flat = gray(256, 256, |_, _| 0.4);
    let (m, blobs, keypoints) = measure_image(&flat, &s).unwrap();
    assert_eq!((blobs, keypoints), (0, 0));
    assert_eq!((m.b, m.keypoints, m.energy), (0.0, 0.0, 0.0));
    assert_eq!((m.edge_sobel, m.edge_scharr, m.clutter), (0.0, 0.0, 0.0));
    // Every other image of the same size costs at least as much as the flat one.
    let mut rng = Lcg(9);
    for other in [
        gray(256, 256, |x, _| x as f32 / 255.0),
        gray(256, 256, |_, _| rng.next()),
        spots(4, 64, 5, true).0,
    ] {
        let (o, _, _) = measure_image(&other, &s).unwrap();
        assert!(o.j > m.j, "flat J {} vs {}", m.j, o.j);
    }
    assert!(m.j < 0.05, "{}", m.j);
}

#[test]
fn noise_scores_higher_than_a_smooth_gradient_on_every_measure() {
    let s = Settings::default();
    let mut rng = Lcg(42);
    let noise = gray(192, 192, |_, _| rng.next());
    let ramp = gray(192, 192, |x, y| (x + y) as f32 / 382.0);
    let (n, _, _) = measure_image(&noise, &s).unwrap();
    let (r, _, _) = measure_image(&ramp, &s).unwrap();
    assert!(n.j > 3.0 * r.j, "noise J {} ramp J {}", n.j, r.j);
    assert!(n.edge_sobel > r.edge_sobel && n.edge_scharr > r.edge_scharr);
    assert!(n.clutter > r.clutter && n.b > r.b);
    assert_eq!(r.b, 0.0, "a linear ramp has no blobs");
}

#[test]
fn checkerboard_has_many_blobs_and_edges() {
    let s = Settings::default();
    let board = gray(128, 128, |x, y| ((x / 8 + y / 8) % 2) as f32);
    let (m, blobs, _) = measure_image(&board, &s).unwrap();
    assert!(blobs > 100, "{blobs}");
    assert!(m.edge_sobel > 0.05 && m.b > 0.2, "{m:?}");
}

#[test]
fn gray_and_rgb_versions_agree_except_where_colour_counts() {
    let s = Settings::default();
    let (g, _) = spots(3, 56, 11, false);
    let c = g.to_rgb();
    let (mg, bg, _) = measure_image(&g, &s).unwrap();
    let (mc, bc, _) = measure_image(&c, &s).unwrap();
    // Gray-level measures work on luma, which replication leaves unchanged.
    assert_eq!(bg, bc);
    assert_eq!((mg.energy, mg.edge_sobel), (mc.energy, mc.edge_sobel));
    // Replicated gray has no chroma, so only the luminance term of clutter remains.
    assert!((mg.clutter - mc.clutter).abs() < 1e-12);
    // By default J encodes luma, so replication changes nothing.
    assert_eq!(mg.j, mc.j);
    // In native channels J divides by 3 raw bytes per pixel; constant chroma costs little.
    let native = Settings {
        color: complexity::ColorRule::Native,
        ..Settings::default()
    };
    let (ng, _, _) = measure_image(&g, &native).unwrap();
    let (nc, _, _) = measure_image(&c, &native).unwrap();
    assert_eq!(ng.j, mg.j);
    assert!(
        nc.j < ng.j && nc.j > ng.j / 4.0,
        "gray {} rgb {}",
        ng.j,
        nc.j
    );
    // A colourful image: chroma adds clutter (whatever the J rule).
    let mut rng = Lcg(3);
    let mut data = Vec::new();
    for _ in 0..64 * 64 {
        data.extend([(rng.next() * 255.0) as u8, (rng.next() * 255.0) as u8, 128]);
    }
    let colour = Image8 {
        width: 64,
        height: 64,
        channels: 3,
        data,
    };
    let luma = colour.to_gray();
    let (a, _, _) = measure_image(&colour, &s).unwrap();
    let (b, _, _) = measure_image(&luma, &s).unwrap();
    assert!(a.clutter > b.clutter);
    assert_eq!(a.j, b.j);
    let (a_native, _, _) = measure_image(&colour, &native).unwrap();
    assert!(a_native.clutter == a.clutter && a_native.j != a.j);
}

#[test]
fn polarity_selects_bright_or_dark_blobs() {
    let (img, n) = spots(3, 56, 21, false);
    let only = |polarity| Settings {
        blob: BlobSettings {
            polarity,
            ..BlobSettings::default()
        },
        ..Settings::default()
    };
    assert!(measure_image(&img, &only(Polarity::Bright)).unwrap().1 < n / 3);
    let dark = measure_image(&img, &only(Polarity::Dark)).unwrap().1;
    assert!(dark.abs_diff(n) <= 1, "{dark} of {n}");
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccnet-cx-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(d.join("images")).unwrap();
    fs::create_dir_all(d.join("masks")).unwrap();
    d
}

fn write_dataset(d: &Path, n: u32, colour: bool) {
    for i in 0..n {
        let (img, _) = spots(2, 48, u64::from(i) + 100, i % 2 == 0);
        let path = d.join(format!("images/{i:02}.png"));
        if colour && i % 2 == 1 {
            RgbImage::from_fn(96, 96, |x, y| {
                let v = img.data[(y * 96 + x) as usize];
                image::Rgb([v, v / 2, 255 - v])
            })
            .save(&path)
            .unwrap();
        } else {
            GrayImage::from_raw(96, 96, img.data)
                .unwrap()
                .save(&path)
                .unwrap();
        }
        GrayImage::from_fn(96, 96, |x, _| Luma([if x < 40 { 0 } else { 255 }]))
            .save(d.join(format!("masks/{i:02}.png")))
            .unwrap();
    }
}

#[test]
fn dataset_means_match_the_images_and_are_reported_with_settings() {
    let d = tempdir("lib");
    write_dataset(&d, 5, true);
    let ds = Dataset::open(&d, true).unwrap();
    let s = Settings::default();
    let r = measure_dataset(&ds, &s, None).unwrap();
    assert_eq!((r.images, r.gray_images, r.rgb_images), (5, 3, 2));
    let mean_j = r.per_image.iter().map(|m| m.measures.j).sum::<f64>() / 5.0;
    assert!((r.mean.j - mean_j).abs() < 1e-12);
    assert!(r.std.j > 0.0);
    let one = complexity::measure_item(&ds.items[3], &s).unwrap();
    assert_eq!(one, r.per_image[3]);
    let report = Report::new(s, vec![r.clone(), r]);
    let table = report.table();
    assert!(
        table.contains("JPEG quality 75") && table.contains("±"),
        "{table}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["settings"]["jpeg_quality"], 75);
    assert_eq!(json["normalised"][0]["j"], 0.5);
    fs::remove_dir_all(&d).unwrap();
}

fn ccnet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ccnet"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn command_writes_table_json_and_plot() {
    let a = tempdir("cli-a");
    let b = tempdir("cli-b");
    write_dataset(&a, 3, false);
    write_dataset(&b, 2, true);
    let plot = a.join("out/complexity.png");
    let json = a.join("out/complexity.json");
    let out = ccnet(&[
        "complexity",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--out",
        json.to_str().unwrap(),
        "--lambda",
        "0.3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("lambda 0.3") && stdout.contains("ccnet-cx-cli-a"),
        "{stdout}"
    );
    let png = image::open(&plot).unwrap();
    assert_eq!((png.width(), png.height()), (1400, 700));
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["datasets"].as_array().unwrap().len(), 2);
    assert_eq!(v["settings"]["lambda"], 0.3);
    let out = ccnet(&["complexity", a.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["datasets"][0]["per_image"].as_array().unwrap().len(), 3);
    fs::remove_dir_all(&a).unwrap();
    fs::remove_dir_all(&b).unwrap();
}

fn fails_naming(args: &[&str], file: &str) {
    let out = ccnet(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(stderr.contains(file), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_is_a_clear_error_naming_the_file() {
    let d = tempdir("bad");
    write_dataset(&d, 2, false);
    let ds = d.to_str().unwrap();
    // Missing mask.
    fs::rename(d.join("masks/01.png"), d.join("01.png.bak")).unwrap();
    fails_naming(&["complexity", ds], "01.png");
    // ...unless masks are ignored.
    assert!(ccnet(&["complexity", ds, "--images-only"]).status.success());
    fs::rename(d.join("01.png.bak"), d.join("masks/01.png")).unwrap();
    // Extra mask.
    GrayImage::new(96, 96).save(d.join("masks/zz.png")).unwrap();
    fails_naming(&["complexity", ds], "zz.png");
    fs::remove_file(d.join("masks/zz.png")).unwrap();
    // Non-binary mask, accepted with a threshold.
    GrayImage::from_pixel(96, 96, Luma([7]))
        .save(d.join("masks/00.png"))
        .unwrap();
    fails_naming(&["complexity", ds], "00.png");
    assert!(ccnet(&["complexity", ds, "--mask-threshold", "5"])
        .status
        .success());
    // Size mismatch.
    GrayImage::new(95, 96).save(d.join("masks/00.png")).unwrap();
    fails_naming(&["complexity", ds], "00.png");
    GrayImage::new(96, 96).save(d.join("masks/00.png")).unwrap();
    // Unreadable image.
    fs::write(d.join("images/01.png"), b"not an image").unwrap();
    fails_naming(&["complexity", ds], "01.png");
    // Missing folder and bad settings.
    fails_naming(
        &["complexity", "no-such-dataset-folder"],
        "no-such-dataset-folder",
    );
    fails_naming(&["complexity", ds, "--lambda", "2"], "lambda");
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bare_image_folder_is_measured_without_masks() {
    let d = std::env::temp_dir().join(format!("ccnet-cx-bare-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    let (img, _) = spots(2, 48, 7, true);
    GrayImage::from_raw(96, 96, img.data)
        .unwrap()
        .save(d.join("a.png"))
        .unwrap();
    let out = ccnet(&["complexity", d.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["datasets"][0]["images"], 1);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn sixteen_bit_tiff_is_stretched_then_measured() {
    let d = tempdir("tiff16");
    let (img, _) = spots(2, 48, 31, true);
    let values: Vec<u16> = img.data.iter().map(|&v| 1000 + 40 * u16::from(v)).collect();
    image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(96, 96, values.clone())
        .unwrap()
        .save(d.join("images/a.tif"))
        .unwrap();
    GrayImage::from_pixel(96, 96, Luma([255]))
        .save(d.join("masks/a.png"))
        .unwrap();
    let ds = Dataset::open(&d, true).unwrap();
    let r = measure_dataset(&ds, &Settings::default(), None).unwrap();
    // The dataset rule: 16-bit values are percentile-stretched to 8 bits, then measured.
    let stretched = Image8 {
        width: 96,
        height: 96,
        channels: 1,
        data: ccnet_host::dataset::stretch_16_to_8(&values),
    };
    assert_ne!(stretched.data, img.data, "the stretch changes the contrast");
    let (m, blobs, _) = measure_image(&stretched, &Settings::default()).unwrap();
    assert_eq!(r.per_image[0].channels, 1);
    assert_eq!((r.mean, r.per_image[0].blob_count), (m, blobs));
    assert!(blobs >= 4, "{blobs}");
    fs::remove_dir_all(&d).unwrap();
}
