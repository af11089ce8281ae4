//! `cargo xtask cuda-check`: proves that the host's `cuda` feature compiles and links, on
//! any machine. It sets up a CUDA 13 toolchain from Python wheels with a `libcuda` stub in
//! a cache folder (`scripts/cuda-toolchain.sh`, once), builds `ccnet` with
//! `--features cuda` into `target/cuda`, and then either times a training epoch on the
//! GPU (when `nvidia-smi` finds one) or checks that `--device cuda` fails with a clear
//! error through the stub (no GPU).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const USAGE: &str = "\
usage: cargo xtask cuda-check [--cache DIR] [--compute-cap N]

  --cache DIR         where the CUDA wheels, toolkit links and libcuda stub live
                      [default: $CCNET_CUDA_CACHE, else ~/.cache/ccnet-cuda]
  --compute-cap N     GPU architecture to compile kernels for [default: 90 (H100/H200)]

The first run downloads about 1.2 GB of wheels and compiles candle's CUDA kernels
(about 13 minutes on 2 cores); later runs relink in seconds.
";

/// Runs the task.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut cache = std::env::var_os("CCNET_CUDA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache")
                .join("ccnet-cuda")
        });
    let mut cap = "90".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--cache" => cache = PathBuf::from(it.next().ok_or("--cache needs a folder")?),
            "--compute-cap" => {
                cap = it
                    .next()
                    .filter(|v| v.parse::<u32>().is_ok())
                    .ok_or("--compute-cap needs a number such as 90")?
                    .clone()
            }
            other => return Err(format!("unknown argument `{other}`\n\n{USAGE}")),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?
        .to_path_buf();
    let cache = std::path::absolute(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;

    println!("==> CUDA toolchain in {}", cache.display());
    let script = root.join("xtask").join("scripts").join("cuda-toolchain.sh");
    let st = Command::new("bash")
        .arg(&script)
        .arg(&cache)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !st.success() {
        return Err(format!(
            "{} failed ({st}); it needs python3 with venv and pip, network access to PyPI, and gcc",
            script.display()
        ));
    }
    let c = cache.join("cuda");
    let path = format!(
        "{}:{}",
        c.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let target = root.join("target").join("cuda");

    println!("==> cargo build --release -p ccnet-host --features cuda (target/cuda)");
    let t0 = Instant::now();
    let st = Command::new(crate::cargo())
        .args([
            "build",
            "--release",
            "-p",
            "ccnet-host",
            "--features",
            "cuda",
            "--bin",
            "ccnet",
        ])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .env("CUDA_HOME", &c)
        .env("CUDA_PATH", &c)
        .env("CUDA_ROOT", &c)
        .env("CUDA_TOOLKIT_ROOT_DIR", &c)
        .env("CUDA_COMPUTE_CAP", &cap)
        .env("PATH", &path)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !st.success() {
        return Err("the `cuda` feature did not build".into());
    }
    println!("built in {:.0} s", t0.elapsed().as_secs_f64());
    let bin = target.join("release").join("ccnet");

    let data = target.join("cuda-check-data");
    write_dataset(&data)?;
    let run_dir = target.join("cuda-check-run");
    let _ = std::fs::remove_dir_all(&run_dir);
    let gpu = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    let train = |device: &str, out: &Path, lib: Option<String>| {
        let mut cmd = Command::new(&bin);
        cmd.args(["train", "--dataset"])
            .arg(&data)
            .args([
                "--arch",
                "unet",
                "--alpha",
                "1/8",
                "--size",
                "128",
                "--steps",
                "50",
                "--epoch-steps",
                "50",
                "--quiet",
                "--device",
                device,
                "--out",
            ])
            .arg(out);
        if let Some(l) = lib {
            cmd.env("LD_LIBRARY_PATH", l);
        }
        let t = Instant::now();
        let o = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        Ok::<_, String>((o, t.elapsed().as_secs_f64()))
    };
    if gpu {
        println!("==> a GPU is present: one epoch (50 steps, U-Net α = 1/8, 128×128, batch 4) on cuda and on cpu");
        let (o, secs) = train("cuda", &run_dir, None)?;
        if !o.status.success() {
            return Err(format!(
                "training on the GPU failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let (o2, cpu_secs) = train("cpu", &target.join("cuda-check-run-cpu"), None)?;
        if !o2.status.success() {
            return Err(format!(
                "training on the CPU failed: {}",
                String::from_utf8_lossy(&o2.stderr)
            ));
        }
        println!(
            "epoch of 50 steps: cuda {secs:.1} s, cpu {cpu_secs:.1} s (whole command, start-up and validation included)"
        );
    } else {
        println!(
            "==> no GPU: `--device cuda` through the libcuda stub must fail with a clear error"
        );
        let lib = format!(
            "{}:{}",
            c.join("lib64").display(),
            c.join("lib64").join("stubs").display()
        );
        let (o, _) = train("cuda", &run_dir, Some(lib))?;
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            return Err("`--device cuda` succeeded through the stub library".into());
        }
        if err.contains("panicked") || !err.to_lowercase().contains("cuda") {
            return Err(format!("`--device cuda` did not fail cleanly:\n{err}"));
        }
        println!("ok: {}", err.trim());
    }
    Ok(())
}

/// Eight 160×160 gray images with bright discs and their masks.
fn write_dataset(dir: &Path) -> Result<(), String> {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for i in 0..8u32 {
        let discs: Vec<(i32, i32, i32)> = (0..5)
            .map(|k| {
                let h = (i * 7 + k * 13) as i32;
                (20 + (h * 37) % 120, 20 + (h * 53) % 120, 6 + h % 10)
            })
            .collect();
        let inside = |x: u32, y: u32| {
            discs
                .iter()
                .any(|&(cx, cy, r)| (x as i32 - cx).pow(2) + (y as i32 - cy).pow(2) < r * r)
        };
        let img = image::GrayImage::from_fn(160, 160, |x, y| {
            let noise = ((x * 31 + y * 17 + i * 101) % 29) as u8;
            image::Luma([if inside(x, y) {
                170 + noise
            } else {
                40 + noise
            }])
        });
        let mask = image::GrayImage::from_fn(160, 160, |x, y| {
            image::Luma([if inside(x, y) { 255 } else { 0 }])
        });
        let name = format!("c{i}.png");
        img.save(dir.join("images").join(&name))
            .map_err(|e| format!("{name}: {e}"))?;
        mask.save(dir.join("masks").join(&name))
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}
