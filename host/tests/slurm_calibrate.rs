//! `ccnet calibrate --slurm` against a real single-node Slurm (slurmctld + slurmd +
//! munge from Debian's packages) started on loopback for this test, with its own ports,
//! munge socket and state folder, and stopped again (only the daemons it started).
//!
//! A tiny sweep (2 generated datasets × 2 widths) runs as a job array; one array task
//! is cancelled mid-run with `scancel`; the same command submitted again runs only that
//! key (resuming its checkpoint); the collect job's calibration equals a local fit of
//! the same run folder. Misuse (no `sbatch`, an unreachable controller, a run folder
//! owned by other settings) is a clear error.
//!
//! The daemons need root and the packages `slurmctld slurmd slurm-client munge`; without
//! them the Slurm test says so and passes, unless `CCNET_REQUIRE_SLURM=1` (set by CI,
//! which installs them) makes their absence a failure.

mod common;

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{disc_dataset as dataset, s};

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemons of a throw-away cluster; dropped, it stops exactly them.
struct LocalSlurm {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<Child>,
}

impl LocalSlurm {
    /// Starts munged, slurmctld and slurmd, or says why it cannot.
    fn start(dir: &Path) -> Result<LocalSlurm, String> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !is_root {
            return Err("the test daemons must be started as root".into());
        }
        for bin in [
            "/usr/sbin/munged",
            "/usr/sbin/slurmctld",
            "/usr/sbin/slurmd",
            "/etc/munge/munge.key",
        ] {
            if !Path::new(bin).exists() {
                return Err(format!(
                    "{bin} is missing (apt-get install slurmctld slurmd slurm-client munge)"
                ));
            }
        }
        for cmd in ["sbatch", "squeue", "scancel", "sinfo", "runuser"] {
            if !on_path(cmd) {
                return Err(format!("`{cmd}` is not on PATH"));
            }
        }
        let munge_dir = dir.join("munge");
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::create_dir_all(&munge_dir).unwrap();
        let chown = Command::new("chown")
            .args(["munge:munge", &s(&munge_dir)])
            .status()
            .unwrap();
        assert!(chown.success());
        let socket = munge_dir.join("munge.socket");
        let mem_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kb| (kb / 1024).saturating_sub(1024).max(512))
            .unwrap_or(1024);
        let d = s(dir);
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=ccnettest\nSlurmctldHost=localhost\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n\
                 SlurmctldPort={p1}\nSlurmdPort={p2}\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
                 JobCompType=jobcomp/none\nSchedulerType=sched/backfill\nSelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core\nReturnToService=2\nMpiDefault=none\nMailProg=/bin/true\n\
                 NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory={mem_mb} State=UNKNOWN\n\
                 PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n",
                sock = s(&socket),
                p1 = free_port(),
                p2 = free_port(),
            ),
        )
        .unwrap();
        let mut me = LocalSlurm {
            dir: dir.to_path_buf(),
            conf,
            daemons: Vec::new(),
        };
        let m = s(&munge_dir);
        me.spawn(
            "munged",
            Command::new("runuser").args([
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                "-F",
                &format!("--socket={}", s(&socket)),
                &format!("--pid-file={m}/munged.pid"),
                &format!("--log-file={m}/munged.log"),
                &format!("--seed-file={m}/munged.seed"),
            ]),
        );
        me.wait_for("munged", || socket.exists(), 10)?;
        let conf = s(&me.conf);
        me.spawn(
            "slurmctld",
            Command::new("/usr/sbin/slurmctld").args(["-D", "-f", &conf]),
        );
        me.spawn(
            "slurmd",
            Command::new("/usr/sbin/slurmd").args(["-D", "-N", "localhost", "-f", &conf]),
        );
        let sinfo = || {
            me.cmd("sinfo")
                .args(["-h", "-o", "%T"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
                .unwrap_or(false)
        };
        me.wait_for("an idle node", sinfo, 60)?;
        Ok(me)
    }

    /// Starts a daemon in its own process group, output in `<name>.out`.
    fn spawn(&mut self, name: &str, c: &mut Command) {
        let out = File::create(self.dir.join(format!("{name}.out"))).unwrap();
        let child = c
            .env("SLURM_CONF", &self.conf)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push(child);
    }

    fn wait_for(&self, what: &str, ready: impl Fn() -> bool, secs: u64) -> Result<(), String> {
        let t0 = Instant::now();
        while !ready() {
            if t0.elapsed() > Duration::from_secs(secs) {
                return Err(format!(
                    "{what} not up after {secs} s; logs in {}",
                    self.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// A Slurm client command talking to this cluster.
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Waits until none of `jobs` is in the queue.
    fn wait_until_gone(&self, jobs: &[&str], secs: u64) {
        let t0 = Instant::now();
        loop {
            let o = self
                .cmd("squeue")
                .args(["-h", "-r", "-o", "%i %T", "-j", &jobs.join(",")])
                .output()
                .unwrap();
            let (out, err) = text(&o);
            if (o.status.success() && out.trim().is_empty()) || err.contains("Invalid job id") {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "jobs {jobs:?} still queued after {secs} s:\n{out}{err}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        for c in self.daemons.iter_mut().rev() {
            // The whole process group: runuser and its munged child, or a daemon.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", c.id())])
                .status();
        }
        for c in self.daemons.iter_mut() {
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", c.id())])
                        .status();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The sweep's command line (without --slurm and its options).
fn sweep_args(root: &Path, steps: &str) -> Vec<String> {
    [
        "calibrate",
        "--arch",
        "unet",
        "--datasets",
        &s(&root.join("cells")),
        &s(&root.join("spots")),
        "--alphas",
        "1/8,1/16",
        "--seeds",
        "1",
        "--size",
        "32",
        "--steps",
        steps,
        "--epoch-steps",
        "20",
        "--runs",
        &s(&root.join("runs")),
        "--out",
        &s(&root.join("collected.json")),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn ccnet(slurm: Option<&LocalSlurm>, args: &[String]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ccnet"));
    c.env("RAYON_NUM_THREADS", "2").args(args);
    if let Some(sl) = slurm {
        c.env("SLURM_CONF", &sl.conf);
    }
    let o = c.output().expect("run ccnet");
    let (out, err) = text(&o);
    assert!(!err.contains("panicked"), "{err}");
    (o.status.success(), out, err)
}

/// `array job A (N tasks), collect job C` → (A, N, C).
fn submitted(out: &str) -> (String, usize, String) {
    let line = out
        .lines()
        .find(|l| l.starts_with("array job "))
        .unwrap_or_else(|| panic!("no job ids in:\n{out}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    (
        w[2].to_string(),
        w[3].trim_start_matches('(').parse().unwrap(),
        w[w.len() - 1].to_string(),
    )
}

fn status(slurm: &LocalSlurm, root: &Path) -> Vec<(String, String)> {
    let mut a = sweep_args(root, STEPS);
    a.push("--status".into());
    let (ok, out, err) = ccnet(Some(slurm), &a);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[1].to_string(), w[0].to_string())
        })
        .collect()
}

const STEPS: &str = "200";

#[test]
fn a_sweep_runs_as_a_job_array_and_a_cancelled_task_is_all_that_reruns() {
    let root = common::scratch("slurm", "sweep");
    let slurm = match LocalSlurm::start(&root.join("cluster")) {
        Ok(sl) => sl,
        Err(why) if std::env::var("CCNET_REQUIRE_SLURM").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: no local Slurm for this test: {why}");
            return;
        }
        Err(why) => panic!("CCNET_REQUIRE_SLURM=1 but no local Slurm: {why}"),
    };
    dataset(&root.join("cells"), 8, 0);
    dataset(&root.join("spots"), 8, 1);
    let mut submit = sweep_args(&root, STEPS);
    submit.extend(
        [
            "--slurm",
            &s(&root.join("jobs")),
            "--cpus-per-task",
            "1",
            "--time",
            "0:30:00",
            "--submit",
        ]
        .map(String::from),
    );
    let (ok, out, err) = ccnet(Some(&slurm), &submit);
    assert!(ok, "{out}{err}");
    assert!(err.contains("4 to submit"), "{err}");
    let (array, tasks, collect) = submitted(&out);
    assert_eq!(tasks, 4);

    // Cancel the first key's task once it has checkpointed, while it still runs.
    let runs = root.join("runs");
    let victim = "unet.cells.a1_8.s0";
    let t0 = Instant::now();
    while !runs.join(victim).join("checkpoint.safetensors").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{victim} never checkpointed; logs in {}",
            root.join("jobs/logs").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = slurm
        .cmd("scancel")
        .arg(format!("{array}_0"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    slurm.wait_until_gone(&[&array, &collect], 600);

    let st = status(&slurm, &root);
    assert_eq!(st.len(), 4, "{st:?}");
    for (key, state) in &st {
        let want = if key == victim { "failed" } else { "done" };
        assert_eq!(state, want, "{key}: {st:?}");
    }
    let finished: Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> = st
        .iter()
        .filter(|(k, _)| k != victim)
        .map(|(k, _)| {
            let p = runs.join(k).join("metrics.json");
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p.clone(), std::fs::read(&p).unwrap(), m)
        })
        .collect();

    // The same command again submits only the cancelled key.
    let (ok, out, err) = ccnet(Some(&slurm), &submit);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("3 finished, 0 queued or running, 1 to submit"),
        "{err}"
    );
    let (array2, tasks2, collect2) = submitted(&out);
    assert_eq!(tasks2, 1);
    assert_ne!(array2, array);
    let script = std::fs::read_to_string(root.join("jobs/calibrate-array.sh")).unwrap();
    assert!(
        script.contains("#SBATCH --array=0-0") && script.contains(victim),
        "{script}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("slurm-jobs.json")).unwrap())
            .unwrap();
    assert_eq!(
        record["submissions"][1]["keys"],
        serde_json::json!([victim])
    );
    slurm.wait_until_gone(&[&array2, &collect2], 600);

    assert!(status(&slurm, &root).iter().all(|(_, s)| s == "done"));
    for (p, bytes, mtime) in &finished {
        assert_eq!(
            &std::fs::read(p).unwrap(),
            bytes,
            "{} was rerun",
            p.display()
        );
        assert_eq!(
            std::fs::metadata(p).unwrap().modified().unwrap(),
            *mtime,
            "{} was rewritten",
            p.display()
        );
    }
    // The resumed run kept the epochs it had before the cancel.
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs.join(victim).join("metrics.json")).unwrap(),
    )
    .unwrap();
    assert!(m["history"].as_array().unwrap().len() >= 2, "{m}");

    // The collect job's calibration is the local fit of the same run folder.
    let collected = root.join("collected.json");
    let logs = root.join("jobs/logs");
    assert!(
        collected.exists(),
        "the collect job wrote nothing; logs in {}",
        logs.display()
    );
    let mut local = sweep_args(&root, STEPS);
    let n = local.len();
    local[n - 1] = s(&root.join("local.json"));
    local.push("--fit-only".into());
    let (ok, _, err) = ccnet(None, &local);
    assert!(ok, "{err}");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(read(&collected), read(&root.join("local.json")));

    // Nothing is left to submit.
    let (ok, out, err) = ccnet(Some(&slurm), &submit);
    assert!(ok && err.contains("nothing to submit"), "{out}{err}");
    assert_eq!(read(&runs.join("slurm-jobs.json")), record_after(&runs));
    drop(slurm);
    let _ = std::fs::remove_dir_all(&root);
}

fn record_after(runs: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("slurm-jobs.json")).unwrap())
            .unwrap();
    assert_eq!(v["submissions"].as_array().unwrap().len(), 2, "{v}");
    v
}

#[test]
fn submit_without_sbatch_on_path_is_a_clear_error() {
    let root = common::scratch("slurm", "no-sbatch");
    dataset(&root.join("cells"), 4, 0);
    dataset(&root.join("spots"), 4, 1);
    let empty = root.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let mut a = sweep_args(&root, "20");
    a.extend(["--slurm", &s(&root.join("jobs")), "--submit"].map(String::from));
    let o = Command::new(env!("CARGO_BIN_EXE_ccnet"))
        .args(&a)
        .env("PATH", &empty)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("`sbatch` is not on PATH") && !err.contains("panicked"),
        "{err}"
    );
    // Without --submit the scripts are written and the command printed.
    let (ok, out, err) = ccnet(None, &a[..a.len() - 1]);
    assert!(ok, "{err}");
    assert!(
        out.contains("sbatch --parsable") && out.contains("afterany"),
        "{out}"
    );
    let script = std::fs::read_to_string(root.join("jobs/calibrate-array.sh")).unwrap();
    assert!(script.contains("#SBATCH --array=0-3"), "{script}");
    assert!(!root.join("runs/slurm-jobs.json").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_run_folder_owned_by_other_settings_is_refused() {
    let root = common::scratch("slurm", "owner");
    dataset(&root.join("cells"), 4, 0);
    dataset(&root.join("spots"), 4, 1);
    let mut a = sweep_args(&root, "20");
    a.extend(["--slurm", &s(&root.join("jobs"))].map(String::from));
    let (ok, _, err) = ccnet(None, &a);
    assert!(ok, "{err}");
    // Same folder, other steps: refused for --slurm, training, --status and --fit-only.
    let other = sweep_args(&root, "40");
    for extra in [
        vec!["--slurm".to_string(), s(&root.join("jobs"))],
        vec![],
        vec!["--status".to_string()],
        vec!["--fit-only".to_string()],
    ] {
        let mut b = other.clone();
        b.extend(extra.clone());
        let (ok, _, err) = ccnet(None, &b);
        assert!(!ok, "{extra:?}: {err}");
        assert!(
            err.contains("belongs to a calibration with other settings")
                && err.contains(&s(&root.join("runs")))
                && err.contains("recipe.epochs: 1 vs 2"),
            "{extra:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_unreachable_controller_is_a_clear_error() {
    if !on_path("sbatch") {
        if std::env::var("CCNET_REQUIRE_SLURM").as_deref() == Ok("1") {
            panic!("CCNET_REQUIRE_SLURM=1 but `sbatch` is not on PATH");
        }
        eprintln!("SKIPPED: `sbatch` is not on PATH");
        return;
    }
    let root = common::scratch("slurm", "unreachable");
    dataset(&root.join("cells"), 4, 0);
    dataset(&root.join("spots"), 4, 1);
    // A controller on a port nobody listens on.
    let conf = root.join("slurm.conf");
    std::fs::write(
        &conf,
        format!(
            "ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort={}\nAuthType=auth/none\n\
             NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=localhost Default=YES\n",
            free_port()
        ),
    )
    .unwrap();
    let mut a = sweep_args(&root, "20");
    a.extend(["--slurm", &s(&root.join("jobs")), "--submit"].map(String::from));
    let o = Command::new(env!("CARGO_BIN_EXE_ccnet"))
        .args(&a)
        .env("SLURM_CONF", &conf)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("sbatch") && err.contains("controller") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!root.join("runs/slurm-jobs.json").exists());
    let _ = std::fs::remove_dir_all(&root);
}
