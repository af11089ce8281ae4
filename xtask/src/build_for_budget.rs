//! `cargo xtask build-for-budget BUDGET`: dataset in, packed model and report out.
//!
//! Steps, each a `ccnet` command whose output is kept in the output folder so that a
//! rerun resumes instead of starting over: prepare the data (the default sample is
//! fetched once with pip), `ccnet select` (complexity + shipped calibration → α),
//! `ccnet train` (resumed from its checkpoint if interrupted), `ccnet pack` (quantize,
//! check the budget on the real file, verify with the device engine on held-out
//! images), `ccnet eval` (overlays), then `report.json` and `report.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const USAGE: &str = "\
usage: cargo xtask build-for-budget BUDGET [options]

  BUDGET              disk budget of the packed model: 1MB (10^6 bytes), 256KiB, 750000
  --ram BYTES         RAM budget of one inference run (e.g. 256KiB)
  --keep FRACTION     keep at least this share of the base network's predicted F1 (e.g. 0.95)
  --dataset DIR       dataset folder with images/ and masks/ [default: a nuclei sample
                      from the Data Science Bowl 2018 shipped in the stardist wheel]
  --arch ARCH         unet, fcn or cumed [default: unet]
  --quant Q           int8, f16 or f32 [default: int8]
  --steps N           training steps [default: 400]
  --size N            training crop side [default: 128]
  --out DIR           output folder [default: target/ccnet/<dataset>]
  --firmware          also build the Cortex-M4F example firmware (device/firmware) with the
                      model and a crop of a dataset image embedded, check that it fits the
                      flash, and run it in qemu-system-arm when installed
  --flash BYTES       flash size the firmware must fit [default: 4MiB, QEMU mps2-an386]
";

struct Options {
    budget: String,
    ram: Option<String>,
    keep: Option<String>,
    dataset: Option<PathBuf>,
    arch: String,
    quant: String,
    steps: String,
    size: String,
    out: Option<PathBuf>,
    firmware: bool,
    flash: String,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut it = args.iter();
    let mut o = Options {
        budget: String::new(),
        ram: None,
        keep: None,
        dataset: None,
        arch: "unet".into(),
        quant: "int8".into(),
        steps: "400".into(),
        size: "128".into(),
        out: None,
        firmware: false,
        flash: "4MiB".into(),
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match a.as_str() {
            "--help" | "-h" => return Err(USAGE.to_string()),
            "--ram" => o.ram = Some(val(a)?),
            "--keep" => o.keep = Some(val(a)?),
            "--dataset" => o.dataset = Some(PathBuf::from(val(a)?)),
            "--arch" => o.arch = val(a)?,
            "--quant" => o.quant = val(a)?,
            "--steps" => o.steps = val(a)?,
            "--size" => o.size = val(a)?,
            "--out" => o.out = Some(PathBuf::from(val(a)?)),
            "--firmware" => o.firmware = true,
            "--flash" => o.flash = val(a)?,
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`\n\n{USAGE}")),
            s if o.budget.is_empty() => o.budget = s.to_string(),
            s => return Err(format!("unexpected argument `{s}`\n\n{USAGE}")),
        }
    }
    if o.budget.is_empty() {
        return Err(format!("the disk budget is required\n\n{USAGE}"));
    }
    ccnet_shared::budget::parse_bytes(&o.budget).map_err(|e| format!("`{}`: {e}", o.budget))?;
    if let Some(r) = &o.ram {
        ccnet_shared::budget::parse_bytes(r).map_err(|e| format!("--ram `{r}`: {e}"))?;
    }
    let flash = ccnet_shared::budget::parse_bytes(&o.flash)
        .map_err(|e| format!("--flash `{}`: {e}", o.flash))?;
    let disk = ccnet_shared::budget::parse_bytes(&o.budget).unwrap_or(0);
    if o.firmware && disk > flash {
        return Err(format!(
            "--firmware: a model of up to {disk} bytes (budget {}) cannot fit a flash of {flash} bytes (--flash {}) next to the runtime; lower the budget or raise --flash",
            o.budget, o.flash
        ));
    }
    if !matches!(o.quant.as_str(), "int8" | "f16" | "f32") {
        return Err(format!("--quant `{}`: expected int8, f16 or f32", o.quant));
    }
    Ok(o)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds `ccnet` in release mode and returns its path (or uses `$CCNET_BIN` when set,
/// e.g. a binary the caller has just built).
fn build_ccnet() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("CCNET_BIN") {
        return Ok(PathBuf::from(bin));
    }
    step("building ccnet (release)");
    let status = Command::new(crate::cargo())
        .args(["build", "--release", "-p", "ccnet-host", "--bin", "ccnet"])
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building ccnet failed".into());
    }
    Ok(target_dir().join("release").join("ccnet"))
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs `ccnet` with `args`, streaming its stderr (progress) and returning stdout.
fn ccnet(bin: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("`ccnet {}` failed", args.join(" ")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// The default data: the 2-D nuclei image and mask of the stardist wheel (Data Science
/// Bowl 2018, BSD-3), fetched once with pip into a cache and cut into 128 × 128 crops.
fn default_dataset(bin: &Path) -> Result<PathBuf, String> {
    let cache = target_dir()
        .join("ccnet")
        .join("cache")
        .join("stardist-0.9.2");
    let ds = cache.join("dsb2018_sample");
    if ds.join("images").is_dir() && ds.join("masks").is_dir() {
        return Ok(ds);
    }
    step("fetching the default sample (stardist 0.9.2 wheel, nuclei image img2d.tif + mask2d.tif)");
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let wheel_dir = cache.join("wheel");
    let pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "stardist==0.9.2",
            "-d",
        ])
        .arg(&wheel_dir)
        .status();
    match pip {
        Ok(s) if s.success() => {}
        _ => {
            return Err(
                "pip is not available (or could not download stardist==0.9.2), so the \
                 default sample cannot be fetched; pass a dataset instead: \
                 --dataset DIR (a folder with images/ and masks/)"
                    .into(),
            )
        }
    }
    let wheel = std::fs::read_dir(&wheel_dir)
        .map_err(|e| format!("{}: {e}", wheel_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip left no stardist wheel")?;
    let unpacked = cache.join("unpacked");
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .map_err(|e| format!("cannot run python3 to unpack the wheel: {e}"))?;
    if !status.success() {
        return Err(format!("{}: cannot unpack", wheel.display()));
    }
    let images = unpacked.join("stardist").join("data").join("images");
    let tmp = cache.join("dsb2018_sample.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    ccnet(
        bin,
        &[
            "crops",
            "--image",
            &s(&images.join("img2d.tif")),
            "--mask",
            &s(&images.join("mask2d.tif")),
            "--size",
            "128",
            "--out",
            &s(&tmp),
        ],
    )?;
    std::fs::rename(&tmp, &ds).map_err(|e| format!("{}: {e}", ds.display()))?;
    Ok(ds)
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Runs the task.
pub fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    let o = parse(args)?;
    let bits = match o.quant.as_str() {
        "int8" => "8",
        "f16" => "16",
        _ => "32",
    };
    let bin = build_ccnet()?;
    let dataset = match &o.dataset {
        Some(d) => d.clone(),
        None => default_dataset(&bin)?,
    };
    let name = dataset
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("ccnet").join(&name));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let ds = s(&dataset);

    step("measuring complexity and choosing the width multiplier (ccnet select)");
    let mut sel_args = vec![
        "select",
        "--dataset",
        &ds,
        "--arch",
        &o.arch,
        "--disk",
        &o.budget,
        "--bits",
        bits,
        "--json",
    ];
    if let Some(r) = &o.ram {
        sel_args.extend(["--ram", r]);
    }
    if let Some(k) = &o.keep {
        sel_args.extend(["--keep", k]);
    }
    let selection: Value = serde_json::from_str(&ccnet(&bin, &sel_args)?)
        .map_err(|e| format!("ccnet select printed invalid JSON: {e}"))?;
    write_atomic(&out.join("select.json"), selection.to_string().as_bytes())?;
    let alpha = selection["selection"]["chosen"]["alpha"]
        .as_str()
        .ok_or("ccnet select chose no α")?
        .to_string();
    eprintln!(
        "chosen α = {alpha}: {}",
        selection["selection"]["reason"].as_str().unwrap_or("")
    );

    let run = out.join("run");
    let metrics = read_json(&run.join("metrics.json"));
    let finished = metrics
        .as_ref()
        .and_then(|m| m["stopped"].as_str())
        .is_some_and(|s| s == "early_stop" || s == "max_epochs");
    let trained_alpha =
        read_json(&run.join("config.json")).and_then(|c| c["alpha"].as_str().map(String::from));
    if trained_alpha.as_deref().is_some_and(|a| a != alpha) {
        return Err(format!(
            "{} holds a run at α = {} but α = {alpha} was chosen now; remove it or pass another --out",
            run.display(),
            trained_alpha.unwrap_or_default()
        ));
    }
    let r = s(&run);
    if finished {
        step("training already finished (kept)");
    } else if run.join("checkpoint.safetensors").exists() {
        step("resuming training (ccnet train --resume)");
        ccnet(&bin, &["train", "--resume", "--out", &r, "--dataset", &ds])?;
    } else {
        step(&format!("training {} at α = {alpha} (ccnet train)", o.arch));
        let _ = std::fs::remove_dir_all(&run);
        ccnet(
            &bin,
            &[
                "train",
                "--dataset",
                &ds,
                "--arch",
                &o.arch,
                "--alpha",
                &alpha,
                "--size",
                &o.size,
                "--steps",
                &o.steps,
                "--out",
                &r,
            ],
        )?;
    }

    step("quantizing, packing and verifying on held-out images (ccnet pack)");
    let model = out.join("model.ccn");
    let pack: Value = serde_json::from_str(&ccnet(
        &bin,
        &[
            "pack",
            "--run",
            &r,
            "--quant",
            &o.quant,
            "--budget",
            &o.budget,
            "--verify",
            "--out",
            &s(&model),
            "--json",
        ],
    )?)
    .map_err(|e| format!("ccnet pack printed invalid JSON: {e}"))?;
    write_atomic(&out.join("pack.json"), pack.to_string().as_bytes())?;

    step("overlays of the float model on held-out images (ccnet eval)");
    let eval_dir = out.join("eval");
    ccnet(
        &bin,
        &[
            "eval",
            "--run",
            &r,
            "--dataset",
            &ds,
            "--out",
            &s(&eval_dir),
            "--overlays",
            "4",
            "--json",
        ],
    )?;

    let firmware = if o.firmware {
        step("building the Cortex-M4F firmware with the model embedded");
        Some(crate::firmware::for_model(
            &model,
            &dataset,
            &out.join("firmware"),
            &o.flash,
        )?)
    } else {
        None
    };

    let mut report = report(&o, &name, &alpha, &selection, &pack, &out);
    report["firmware"] = firmware.unwrap_or(Value::Null);
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())?
            .as_bytes(),
    )?;
    let md = markdown(&report);
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    println!("{md}");
    println!("outputs in {}", out.display());
    Ok(())
}

fn report(o: &Options, name: &str, alpha: &str, sel: &Value, pack: &Value, out: &Path) -> Value {
    let chosen = &sel["selection"]["chosen"];
    let grid = sel["selection"]["grid"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let base_params = grid
        .iter()
        .filter_map(|c| c["params"].as_u64())
        .max()
        .unwrap_or(0);
    let params = pack["params"].as_u64().unwrap_or(0);
    json!({
        "dataset": name,
        "architecture": o.arch,
        "budget": { "disk": o.budget, "ram": o.ram, "keep": o.keep, "quant": o.quant },
        "complexity": { "j": sel["j"], "b": sel["b"] },
        "calibration": sel["calibration"],
        "predicted_slopes": { "m_f1": sel["m_f1"], "m_iu": sel["m_iu"] },
        "alpha": alpha,
        "why": sel["selection"]["reason"],
        "predicted": {
            "relative_f1": chosen["rel_f1"],
            "relative_iu": chosen["rel_iu"],
            "f1": sel["predicted_f1"],
            "iu": sel["predicted_iu"],
        },
        "achieved": {
            "f1": pack["verify"]["mean"]["f1"],
            "iu": pack["verify"]["mean"]["iu"],
            "images": pack["verify"]["per_image"].as_array().map(Vec::len),
            "float_validation_f1": pack["run_val_f1"],
        },
        "parameters": params,
        "base_parameters": base_params,
        "compression": if params > 0 { base_params as f64 / params as f64 } else { 0.0 },
        "file_bytes": pack["file_bytes"],
        "budget_bytes": pack["budget"],
        "arena_bytes": pack["verify"]["arena_bytes"],
        "tile_arena_bytes": pack["tile_arena_bytes"],
        "host_latency_ms": pack["verify"]["mean_latency_ms"],
        "training": { "steps": o.steps, "crop": o.size },
        "files": {
            "model": out.join("model.ccn"),
            "overlays": out.join("eval"),
            "selection": out.join("select.json"),
        }
    })
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

fn markdown(r: &Value) -> String {
    format!(
        "# ccnet build for {disk}: {arch} on {ds}\n\n\
         | | |\n|---|---|\n\
         | dataset complexity | J = {j}, B = {b} |\n\
         | calibration | {cal} |\n\
         | predicted slopes | m_F1 = {mf1}, m_IU = {miu} per decade of parameters |\n\
         | chosen α | **{alpha}** ({why}) |\n\
         | parameters | {p} (base α = 1: {bp}, compression {cx}×) |\n\
         | predicted F1 / IU | {pf1} / {piu} (relative to base: {rf1} / {riu}) |\n\
         | **achieved F1 / IU** (packed {q} model, device engine, {n} held-out images) | **{af1} / {aiu}** |\n\
         | float validation F1 of the trained run | {ff1} |\n\
         | file | {fb} bytes (budget {bb} bytes) |\n\
         | arena | {ab} bytes for the largest held-out image, {tb} bytes per planned tile |\n\
         | host latency | {lat} ms per image (device engine, 1 thread) |\n\
         | training | {steps} steps of {crop}×{crop} crops |\n{fw}",
        disk = r["budget"]["disk"].as_str().unwrap_or(""),
        arch = r["architecture"].as_str().unwrap_or(""),
        ds = r["dataset"].as_str().unwrap_or(""),
        j = num(&r["complexity"]["j"], 4),
        b = num(&r["complexity"]["b"], 4),
        cal = r["calibration"].as_str().unwrap_or(""),
        mf1 = num(&r["predicted_slopes"]["m_f1"], 4),
        miu = num(&r["predicted_slopes"]["m_iu"], 4),
        alpha = r["alpha"].as_str().unwrap_or(""),
        why = r["why"].as_str().unwrap_or(""),
        p = r["parameters"],
        bp = r["base_parameters"],
        cx = num(&r["compression"], 1),
        pf1 = num(&r["predicted"]["f1"], 3),
        piu = num(&r["predicted"]["iu"], 3),
        rf1 = num(&r["predicted"]["relative_f1"], 3),
        riu = num(&r["predicted"]["relative_iu"], 3),
        q = r["budget"]["quant"].as_str().unwrap_or(""),
        n = r["achieved"]["images"],
        af1 = num(&r["achieved"]["f1"], 3),
        aiu = num(&r["achieved"]["iu"], 3),
        ff1 = num(&r["achieved"]["float_validation_f1"], 3),
        fb = r["file_bytes"],
        bb = r["budget_bytes"],
        ab = r["arena_bytes"],
        tb = r["tile_arena_bytes"],
        lat = num(&r["host_latency_ms"], 1),
        steps = r["training"]["steps"].as_str().unwrap_or(""),
        crop = r["training"]["crop"].as_str().unwrap_or(""),
        fw = firmware_row(&r["firmware"]),
    )
}

fn firmware_row(f: &Value) -> String {
    if f.is_null() {
        return String::new();
    }
    format!(
        "| firmware (Cortex-M4F, opt-level \"z\") | {fb} bytes of flash (runtime {rb}, model {mb}, test image {ib}; limit {lb}); {qemu} |\n",
        fb = f["flash_bytes"],
        rb = f["runtime_bytes"],
        mb = f["model_bytes"],
        ib = f["image_bytes"],
        lb = f["flash_limit"],
        qemu = f["qemu"].as_str().unwrap_or(""),
    )
}
