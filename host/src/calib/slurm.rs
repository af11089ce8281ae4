//! Handing a calibration sweep to Slurm. No scheduler of our own: every pending run key
//! becomes one task of a job array (`ccnet calibrate ... --only KEY`), and a collect job
//! that depends on the array (`afterany`) fits the calibration from whatever finished.
//!
//! What was submitted is recorded in the run folder (`slurm-jobs.json`, written
//! atomically), so that `--status` can tell queued, running and failed keys apart by
//! asking `squeue`, and a rerun submits only the keys that are neither finished nor
//! still in the queue.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::sweep::{RunKey, RunState, Sweep};

/// File in the run folder that records the submissions.
pub const RECORD_FILE: &str = "slurm-jobs.json";

/// `#SBATCH` settings of the generated scripts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSettings {
    /// Partition (`--partition`), or the cluster's default.
    pub partition: Option<String>,
    /// Generic resources per task (`--gres`, e.g. `gpu:1`).
    pub gres: Option<String>,
    /// Wall-time limit per task (`--time`).
    pub time: String,
    /// CPUs per task (`--cpus-per-task`; also the task's thread count).
    pub cpus_per_task: u32,
}

/// One `sbatch` of an array and its collect job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// Job id of the array.
    pub array_job: String,
    /// Job id of the collect job.
    pub collect_job: String,
    /// Run keys, in array-task order (task `i` runs `keys[i]`).
    pub keys: Vec<String>,
    /// Seconds since the Unix epoch at submission.
    pub submitted_unix: u64,
}

/// Everything submitted for one run folder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Submissions, oldest first.
    pub submissions: Vec<Submission>,
}

impl Record {
    /// Reads the record of a run folder (empty when there is none).
    pub fn load(runs_dir: &Path) -> Result<Record> {
        let path = runs_dir.join(RECORD_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s)
                .with_context(|| format!("{}: invalid contents", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
        }
    }

    /// Writes the record atomically.
    pub fn save(&self, runs_dir: &Path) -> Result<()> {
        let path = runs_dir.join(RECORD_FILE);
        crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(self)?.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// The Slurm job id (`ARRAY_TASK`) of the latest submission of `key`.
    pub fn latest_task(&self, key: &str) -> Option<String> {
        self.submissions.iter().rev().find_map(|s| {
            s.keys
                .iter()
                .position(|k| k == key)
                .map(|i| format!("{}_{i}", s.array_job))
        })
    }

    /// Every job id recorded (arrays and collect jobs; a collect job whose submission
    /// failed is recorded empty and left out).
    pub fn job_ids(&self) -> Vec<String> {
        self.submissions
            .iter()
            .flat_map(|s| [s.array_job.clone(), s.collect_job.clone()])
            .filter(|id| !id.is_empty())
            .collect()
    }
}

/// What a run key is doing, as `ccnet calibrate --status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Finished.
    Done,
    /// Submitted, waiting in the Slurm queue.
    Queued,
    /// Submitted, running under Slurm.
    Running,
    /// Submitted, no longer in the queue, and not finished (cancelled, timed out,
    /// crashed or out of memory): the next submission runs it again (resuming from its
    /// checkpoint).
    Failed,
    /// Started outside Slurm (or before its submission was recorded), not finished.
    Partial,
    /// Not started.
    Pending,
    /// Submitted and not finished, but `squeue` could not be asked.
    Unknown,
}

impl KeyState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Done => "done",
            KeyState::Queued => "queued",
            KeyState::Running => "running",
            KeyState::Failed => "failed",
            KeyState::Partial => "partial",
            KeyState::Pending => "pending",
            KeyState::Unknown => "unknown",
        }
    }

    /// Whether a (re)submission should include the key.
    pub fn needs_submission(self) -> bool {
        matches!(
            self,
            KeyState::Failed | KeyState::Partial | KeyState::Pending
        )
    }
}

/// The state of every key of `sweep`, asking `squeue` about recorded submissions.
/// `squeue` is only called when something submitted is unfinished; its failure makes
/// those keys [`KeyState::Unknown`] and is returned as the second value.
pub fn key_states(sweep: &Sweep, record: &Record) -> (Vec<(RunKey, KeyState)>, Option<String>) {
    let keys = sweep.keys();
    let unfinished_submitted = keys
        .iter()
        .any(|(k, _)| sweep.state(k) != RunState::Done && record.latest_task(&k.id()).is_some());
    let (queue, queue_error) = if unfinished_submitted {
        match queue_states(&record.job_ids()) {
            Ok(q) => (Some(q), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (Some(HashMap::new()), None)
    };
    let states = keys
        .into_iter()
        .map(|(k, _)| {
            let local = sweep.state(&k);
            let st = match (local, record.latest_task(&k.id())) {
                (RunState::Done, _) => KeyState::Done,
                (_, Some(task)) => match &queue {
                    None => KeyState::Unknown,
                    Some(q) => match q.get(&task).map(String::as_str) {
                        Some("PENDING") | Some("CONFIGURING") | Some("REQUEUED") => {
                            KeyState::Queued
                        }
                        Some(_) => KeyState::Running,
                        None => KeyState::Failed,
                    },
                },
                (RunState::Partial, None) => KeyState::Partial,
                (RunState::Pending, None) => KeyState::Pending,
            };
            (k, st)
        })
        .collect();
    (states, queue_error)
}

/// `squeue` states of the tasks of the given jobs, keyed `ARRAY_TASK` (and plain job
/// id for non-array jobs). Jobs that have left the queue are absent.
pub fn queue_states(job_ids: &[String]) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    if job_ids.is_empty() {
        return Ok(out);
    }
    let squeue = find_on_path("squeue").ok_or_else(|| {
        anyhow!("`squeue` is not on PATH: cannot ask Slurm about the submitted runs")
    })?;
    let o = Command::new(&squeue)
        .args(["-h", "-r", "-o", "%i %T", "-j", &job_ids.join(",")])
        .output()
        .with_context(|| format!("cannot run {}", squeue.display()))?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        // Slurm answers "Invalid job id specified" when every job has left the queue.
        if stderr.contains("Invalid job id") {
            return Ok(out);
        }
        bail!(
            "squeue failed ({}): {} (is the Slurm controller reachable? try `scontrol ping`)",
            o.status,
            stderr.trim()
        );
    }
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        if let Some((id, state)) = line.trim().split_once(' ') {
            out.insert(id.to_string(), state.trim().to_string());
        }
    }
    Ok(out)
}

/// The executable `name` on PATH, if any.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn header(name: &str, log: &str, dir: &Path, workdir: &Path, job: &JobSettings) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    s += &format!("#SBATCH --job-name={name}\n");
    s += &format!("#SBATCH --chdir={}\n", q(workdir));
    s += &format!("#SBATCH --output={}\n", q(&dir.join("logs").join(log)));
    s += &format!("#SBATCH --cpus-per-task={}\n", job.cpus_per_task);
    s += &format!("#SBATCH --time={}\n", job.time);
    if let Some(p) = &job.partition {
        s += &format!("#SBATCH --partition={p}\n");
    }
    s
}

/// The job-array script: task `i` runs `keys[i]` with `command --only KEY`.
pub fn array_script(
    keys: &[String],
    command: &[String],
    dir: &Path,
    workdir: &Path,
    job: &JobSettings,
) -> String {
    let mut s = header("ccnet-calibrate", "%x-%A_%a.out", dir, workdir, job);
    s += &format!("#SBATCH --array=0-{}\n", keys.len().saturating_sub(1));
    if let Some(g) = &job.gres {
        s += &format!("#SBATCH --gres={g}\n");
    }
    s += "# One calibration run per array task; written by `ccnet calibrate --slurm`.\n";
    s += "set -euo pipefail\nKEYS=(\n";
    for k in keys {
        s += &format!("  {}\n", shell_quote(k));
    }
    s += ")\nKEY=\"${KEYS[$SLURM_ARRAY_TASK_ID]}\"\n";
    s += "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n";
    s += &format!("exec {} --only \"$KEY\" --quiet\n", join_quoted(command));
    s
}

/// The collect script: fits and writes the calibration from the finished runs.
pub fn collect_script(command: &[String], dir: &Path, workdir: &Path, job: &JobSettings) -> String {
    let mut s = header("ccnet-collect", "%x-%j.out", dir, workdir, job);
    s += "# Fits the calibration from whatever runs finished; written by `ccnet calibrate --slurm`.\n";
    s += "set -euo pipefail\n";
    s += "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n";
    s += &format!("exec {} --fit-only\n", join_quoted(command));
    s
}

fn join_quoted(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `sbatch --parsable [extra...] script` and returns the job id.
pub fn sbatch(sbatch: &Path, script: &Path, extra: &[String]) -> Result<String> {
    let o = Command::new(sbatch)
        .arg("--parsable")
        .args(extra)
        .arg(script)
        .output()
        .with_context(|| format!("cannot run {}", sbatch.display()))?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!(
            "sbatch {} failed ({}): {} (is the Slurm controller reachable? try `scontrol ping`)",
            script.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    // `--parsable` prints "JOBID" or "JOBID;CLUSTER".
    let id = stdout
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!(
            "sbatch {}: unexpected answer `{}`",
            script.display(),
            stdout.trim()
        );
    }
    Ok(id)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobSettings {
        JobSettings {
            partition: Some("gpu".into()),
            gres: Some("gpu:1".into()),
            time: "2:00:00".into(),
            cpus_per_task: 4,
        }
    }

    #[test]
    fn shell_words_survive_quoting() {
        assert_eq!(shell_quote("a/b-c_1.json"), "a/b-c_1.json");
        assert_eq!(shell_quote("my data"), "'my data'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn the_array_script_maps_task_ids_to_keys() {
        let keys = vec!["unet.a.a1_8.s0".to_string(), "unet.b c.a1_8.s0".to_string()];
        let cmd = vec![
            "/bin/ccnet".to_string(),
            "calibrate".into(),
            "--runs".into(),
            "/r s".into(),
        ];
        let s = array_script(&keys, &cmd, Path::new("/d"), Path::new("/w"), &job());
        assert!(s.starts_with("#!/bin/bash\n"), "{s}");
        for line in [
            "#SBATCH --array=0-1",
            "#SBATCH --partition=gpu",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --time=2:00:00",
            "#SBATCH --cpus-per-task=4",
            "#SBATCH --chdir=/w",
            "  unet.a.a1_8.s0",
            "  'unet.b c.a1_8.s0'",
            "exec /bin/ccnet calibrate --runs '/r s' --only \"$KEY\" --quiet",
        ] {
            assert!(s.lines().any(|l| l == line), "missing `{line}` in\n{s}");
        }
        let c = collect_script(&cmd, Path::new("/d"), Path::new("/w"), &job());
        assert!(
            c.contains("--fit-only") && !c.contains("--array") && !c.contains("--gres"),
            "{c}"
        );
    }

    #[test]
    fn the_record_finds_the_latest_task_of_a_key() {
        let mut r = Record::default();
        assert_eq!(r.latest_task("k1"), None);
        r.submissions.push(Submission {
            array_job: "10".into(),
            collect_job: "11".into(),
            keys: vec!["k0".into(), "k1".into()],
            submitted_unix: 0,
        });
        r.submissions.push(Submission {
            array_job: "20".into(),
            collect_job: "21".into(),
            keys: vec!["k1".into()],
            submitted_unix: 1,
        });
        assert_eq!(r.latest_task("k0").as_deref(), Some("10_0"));
        assert_eq!(r.latest_task("k1").as_deref(), Some("20_0"));
        assert_eq!(r.job_ids(), ["10", "11", "20", "21"]);
        let dir = std::env::temp_dir().join(format!("ccnet-slurm-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        r.save(&dir).unwrap();
        assert_eq!(Record::load(&dir).unwrap(), r);
        std::fs::write(dir.join(RECORD_FILE), "{").unwrap();
        let e = Record::load(&dir).unwrap_err();
        assert!(format!("{e:#}").contains(RECORD_FILE), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
