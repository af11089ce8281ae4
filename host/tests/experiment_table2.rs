//! `ccnet experiment table2` end to end on generated data: every row trained, packed and
//! evaluated on the device engine; squeezed and pruned rows smaller than what they start
//! from; a rerun trains nothing; another experiment's folder is refused. Run in release
//! mode: it trains about ten tiny networks.

mod common;

use common::{ccnet, disc_dataset, s, scratch};

#[test]
fn table2_trains_packs_and_resumes() {
    let dir = scratch("experiment", "table2");
    let data = dir.join("discs");
    disc_dataset(&data, 10, 3);
    let out = dir.join("exp");
    let args = [
        "experiment",
        "table2",
        "--datasets",
        &s(&data),
        "--archs",
        "unet",
        "--size",
        "32",
        "--steps",
        "8",
        "--finetune-steps",
        "4",
        "--prune-fraction",
        "0.25",
        "--prune-rounds",
        "2",
        "--keep",
        "0.5",
        "--out",
        &s(&out),
        "--quiet",
    ];
    let (ok, stdout, stderr) = ccnet(&args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("### Table 2") && stdout.contains("### Table 3"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/tables.json")).unwrap())
            .unwrap();
    let md = std::fs::read_to_string(out.join("unet/tables.md")).unwrap();
    let ds = &json["datasets"][0];
    let rows = ds["rows"].as_array().unwrap();
    let row = |m: &str| {
        rows.iter()
            .find(|r| r["method"] == m)
            .unwrap_or_else(|| panic!("no row {m}: {rows:?}"))
    };
    for m in [
        "base",
        "base + squeeze",
        "base + prune",
        "CC-Net case 1",
        "CC-Net case 1 + squeeze",
        "CC-Net case 1 + prune",
        "CC-Net case 2 (1 MB)",
    ] {
        let r = row(m);
        assert!(
            md.contains(&format!("| {m} |")),
            "{m} missing from tables.md"
        );
        assert!(r["file_bytes"].as_u64().unwrap() > 1000, "{m}: {r}");
        let f1 = r["f1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&f1), "{m}: {r}");
        assert!(r["params"].as_u64().unwrap() > 0);
        // The packed file is really there, next to its run.
        let run = std::path::PathBuf::from(r["run"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(run.join("model.ccn")).unwrap().len(),
            r["file_bytes"].as_u64().unwrap()
        );
    }
    let p = |m: &str| row(m)["params"].as_u64().unwrap();
    assert!(p("base + squeeze") < p("base"));
    assert!(p("CC-Net case 1 + squeeze") < p("CC-Net case 1"));
    assert!(p("base + prune") <= p("base"));
    assert!(p("CC-Net case 1") <= p("base"));
    // Pruning tried at least one round (fine-tuning epochs counted), and its total time
    // includes the base network's training.
    let pr = row("base + prune");
    let (kept, tried) = (
        pr["pruning_rounds"][0].as_u64().unwrap(),
        pr["pruning_rounds"][1].as_u64().unwrap(),
    );
    assert!(tried >= 1 && kept <= tried, "{pr}");
    assert!(pr["pruning_epochs"].as_u64().unwrap() >= tried);
    assert!(pr["total_seconds"].as_f64().unwrap() > row("base")["total_seconds"].as_f64().unwrap());
    if kept > 0 {
        assert!(p("base + prune") < p("base"));
    }

    // A rerun trains nothing: finished runs are left as they are.
    let metrics = out.join("unet/discs/alpha-1_8/metrics.json");
    let before = std::fs::read_to_string(&metrics).unwrap();
    let stamp = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let (ok, stdout2, stderr) = ccnet(&args);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        stamp
    );
    let table =
        |s: &str| s[s.find("### Table 2").unwrap()..s.find("### Table 3").unwrap()].to_string();
    assert_eq!(table(&stdout2), table(&stdout));

    // The folder belongs to these settings.
    let mut other = args.to_vec();
    let at = other.iter().position(|a| *a == "--keep").unwrap() + 1;
    other[at] = "0.9";
    let (ok, _, stderr) = ccnet(&other);
    assert!(!ok);
    assert!(
        stderr.contains("other settings") && stderr.contains("keep"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn table2_runs_for_fcn_and_cumedvision() {
    let dir = scratch("experiment", "archs");
    let data = dir.join("discs");
    disc_dataset(&data, 8, 5);
    let out = dir.join("exp");
    let (ok, _, stderr) = ccnet(&[
        "experiment",
        "table2",
        "--datasets",
        &s(&data),
        "--archs",
        "fcn,cumed",
        "--size",
        "32",
        "--steps",
        "3",
        "--finetune-steps",
        "2",
        "--prune-rounds",
        "1",
        "--keep",
        "0.5",
        "--out",
        &s(&out),
        "--quiet",
    ]);
    assert!(ok, "{stderr}");
    for arch in ["fcn", "cumed"] {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(arch).join("tables.json")).unwrap(),
        )
        .unwrap();
        let rows = json["datasets"][0]["rows"].as_array().unwrap();
        assert!(rows.len() >= 7, "{arch}: {rows:?}");
        let params = |m: &str| {
            rows.iter().find(|r| r["method"] == m).unwrap()["params"]
                .as_u64()
                .unwrap()
        };
        assert!(params("base + squeeze") < params("base"), "{arch}");
        assert!(rows.iter().all(|r| r["file_bytes"].as_u64().unwrap() > 0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
