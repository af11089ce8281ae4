//! Crash safety: `ccnet train` and `ccnet calibrate` killed with SIGKILL mid-run, then
//! run again. Training resumes from its last checkpoint (at most the epoch in progress
//! is lost) and ends bit-identical to an uninterrupted run; a calibration sweep skips
//! the runs it had finished and resumes the one it was in. Every file left by the kill
//! is complete (written atomically).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use ccnet_host::train::checkpoint;
use common::{disc_dataset as dataset, s};

fn ccnet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ccnet"));
    c.env("RAYON_NUM_THREADS", "2");
    c
}

fn finish(c: &mut Command) -> String {
    let out = c.output().expect("run ccnet");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !text.contains("panicked"), "{text}");
    text
}

/// Waits (at most a minute) until `ready()` holds while `child` runs, then SIGKILLs it.
/// Panics if the child ended first: the kill must land mid-run.
fn kill_when(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("ccnet ended ({st}) before {what}; make the run longer");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out before {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "ccnet ended before the kill ({what})"
    );
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not complete JSON: {e}", path.display()))
}

fn epochs_recorded(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["history"].as_array().map(|h| h.len()))
        .unwrap_or(0)
}

/// The `epoch` and `step` of a checkpoint's training state.
fn checkpoint_position(run: &Path) -> (u64, u64) {
    let (_, meta) = checkpoint::load(&run.join("checkpoint.safetensors"), &Device::Cpu)
        .expect("the checkpoint left by the kill loads");
    let st: serde_json::Value = serde_json::from_str(&meta[checkpoint::STATE_KEY]).unwrap();
    (st["epoch"].as_u64().unwrap(), st["step"].as_u64().unwrap())
}

/// Every file of a run folder is complete: JSON parses, checkpoints load.
fn assert_complete(run: &Path) {
    for e in std::fs::read_dir(run).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".json") {
            json(&p);
        } else if name.ends_with(".safetensors") {
            checkpoint::load(&p, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: incomplete: {e}", p.display()));
        }
    }
}

/// Two records of one epoch are the same record (not a retrained epoch): equal losses
/// and equal measured step times (up to the last digit of a JSON round trip).
fn assert_same_record(a: &serde_json::Value, b: &serde_json::Value, run: &Path) {
    assert_eq!(a["epoch"], b["epoch"]);
    for k in ["train_loss", "seconds_per_step", "val_seconds"] {
        let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-12 * x.abs().max(1e-9),
            "{}: epoch {} {k} {x} became {y}",
            run.display(),
            a["epoch"]
        );
    }
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let ta = checkpoint::load(a, &Device::Cpu).unwrap().0;
    let tb = checkpoint::load(b, &Device::Cpu).unwrap().0;
    assert_eq!(ta.len(), tb.len());
    for (k, x) in &ta {
        let d = (x - &tb[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            d,
            0.0,
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

const EPOCH_STEPS: u64 = 10;
const EPOCHS: u64 = 12;

fn train_cmd(data: &Path, out: &Path) -> Command {
    let mut c = ccnet();
    c.args([
        "train",
        "--dataset",
        &s(data),
        "--arch",
        "cumed",
        "--alpha",
        "1/16",
        "--size",
        "32",
        "--batch",
        "2",
        "--steps",
        &(EPOCH_STEPS * EPOCHS).to_string(),
        "--epoch-steps",
        &EPOCH_STEPS.to_string(),
        "--patience",
        "0",
        "--seed",
        "3",
        "--quiet",
        "--out",
        &s(out),
    ]);
    c
}

#[test]
fn killed_training_resumes_losing_at_most_one_epoch() {
    let root = common::scratch("crash-safety", "train");
    let data = root.join("data");
    dataset(&data, 6, 0);

    // Reference: the same run without interruption.
    let whole = root.join("whole");
    finish(&mut train_cmd(&data, &whole));

    let run = root.join("killed");
    let mut child = train_cmd(&data, &run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_when(&mut child, "the first checkpoint", || {
        epochs_recorded(&run) >= 1
    });
    assert_complete(&run);
    let seen = epochs_recorded(&run) as u64;
    let (ck_epoch, ck_step) = checkpoint_position(&run);
    assert_eq!(ck_step, ck_epoch * EPOCH_STEPS);
    // The checkpoint is written before metrics.json, so it holds every recorded epoch:
    // only the epoch in progress at the kill is lost.
    assert!(
        ck_epoch >= seen && (1..EPOCHS).contains(&ck_epoch),
        "checkpoint at epoch {ck_epoch}, {seen} epochs recorded"
    );
    let before = json(&run.join("metrics.json"));

    let text = finish(train_cmd(&data, &run).arg("--resume"));
    let after = json(&run.join("metrics.json"));
    let history = after["history"].as_array().unwrap();
    assert_eq!(history.len() as u64, EPOCHS, "{text}");
    for (i, e) in history.iter().enumerate() {
        assert_eq!(e["epoch"].as_u64(), Some(i as u64 + 1));
        assert_eq!(e["steps"].as_u64(), Some((i as u64 + 1) * EPOCH_STEPS));
    }
    // Epochs recorded before the kill were kept, not trained again.
    for (a, b) in before["history"].as_array().unwrap().iter().zip(history) {
        assert_same_record(a, b, &run);
    }
    assert_eq!(after["steps_done"].as_u64(), Some(EPOCHS * EPOCH_STEPS));
    assert_eq!(after["stopped"], "max_epochs");
    // Resuming from the checkpoint gives exactly the uninterrupted run.
    assert_same_tensors(
        &whole.join("checkpoint.safetensors"),
        &run.join("checkpoint.safetensors"),
    );
    assert_same_tensors(
        &whole.join("weights.safetensors"),
        &run.join("weights.safetensors"),
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn killed_calibration_skips_finished_runs() {
    let root = common::scratch("crash-safety", "calibrate");
    let (d1, d2) = (root.join("alpha_set"), root.join("beta_set"));
    dataset(&d1, 5, 1);
    dataset(&d2, 5, 2);
    let runs = root.join("runs");
    let cal = root.join("cal.json");
    let cmd = || {
        let mut c = ccnet();
        c.args([
            "calibrate",
            "--arch",
            "cumed",
            "--datasets",
            &s(&d1),
            &s(&d2),
            "--alphas",
            "1/16,1/32",
            "--seeds",
            "1",
            "--size",
            "32",
            "--steps",
            "40",
            "--epoch-steps",
            "10",
            "--runs",
            &s(&runs),
            "--out",
            &s(&cal),
            "--quiet",
        ]);
        c
    };
    let done = |dir: &Path| {
        std::fs::read_to_string(dir.join("metrics.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["stopped"] == "max_epochs" || v["stopped"] == "early_stop")
    };
    let run_dirs = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&runs)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut child = cmd()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once one run is finished and the next one has checkpointed an epoch.
    kill_when(&mut child, "one finished run and one partial run", || {
        let dirs = run_dirs();
        dirs.iter().filter(|d| done(d)).count() >= 1
            && dirs.iter().any(|d| !done(d) && epochs_recorded(d) >= 1)
    });
    assert!(
        !cal.exists(),
        "the calibration file appeared before the sweep ended"
    );
    let finished: Vec<PathBuf> = run_dirs().into_iter().filter(|d| done(d)).collect();
    let partial: Vec<PathBuf> = run_dirs().into_iter().filter(|d| !done(d)).collect();
    assert!(!finished.is_empty() && !partial.is_empty());
    let mut stamps: HashMap<PathBuf, (Vec<u8>, SystemTime)> = HashMap::new();
    for d in &finished {
        assert_complete(d);
        let w = d.join("weights.safetensors");
        stamps.insert(
            d.clone(),
            (std::fs::read(d.join("metrics.json")).unwrap(), mtime(&w)),
        );
    }
    let partial_seen: Vec<(PathBuf, Vec<serde_json::Value>)> = partial
        .iter()
        .filter(|d| epochs_recorded(d) > 0)
        .map(|d| {
            let h = json(&d.join("metrics.json"))["history"]
                .as_array()
                .unwrap()
                .clone();
            (d.clone(), h)
        })
        .collect();
    assert!(!partial_seen.is_empty());

    let text = finish(&mut cmd());
    assert!(
        text.contains(&format!(
            "4 runs in the sweep, {} finished, {} to train",
            finished.len(),
            4 - finished.len()
        )),
        "{text}"
    );
    let dirs = run_dirs();
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    assert!(dirs.iter().all(|d| done(d)), "{text}");
    for (d, (metrics, wtime)) in &stamps {
        assert_eq!(
            &std::fs::read(d.join("metrics.json")).unwrap(),
            metrics,
            "{}: a finished run was trained again",
            d.display()
        );
        assert_eq!(
            mtime(&d.join("weights.safetensors")),
            *wtime,
            "{}",
            d.display()
        );
    }
    // The partial run continued from its checkpoint: its recorded epochs were kept.
    for (d, seen) in partial_seen {
        let after = json(&d.join("metrics.json"));
        let h = after["history"].as_array().unwrap();
        assert_eq!(h.len(), 4, "{}", d.display());
        for (a, b) in seen.iter().zip(h) {
            assert_same_record(a, b, &d);
        }
    }
    json(&cal);
    let _ = std::fs::remove_dir_all(&root);
}

/// A kill after the last checkpoint but before its `metrics.json` (which then still
/// says `running`): resuming writes the finished record instead of leaving the run
/// unfinished for ever.
#[test]
fn a_run_killed_after_its_last_checkpoint_is_finished_on_resume() {
    let root = common::scratch("crash-safety", "last-epoch");
    let data = root.join("data");
    dataset(&data, 8, 4);
    let run = root.join("run");
    finish(&mut train_cmd(&data, &run));
    let metrics = run.join("metrics.json");
    let done = json(&metrics);
    assert_eq!(done["stopped"], "max_epochs");
    let mut stale = done.clone();
    stale["stopped"] = "running".into();
    stale["history"].as_array_mut().unwrap().pop();
    std::fs::write(&metrics, serde_json::to_string(&stale).unwrap()).unwrap();
    finish(ccnet().args(["train", "--resume", "--quiet", "--out", &s(&run)]));
    assert_eq!(json(&metrics), done);
    std::fs::remove_dir_all(&root).unwrap();
}
