//! Complexity on the real datasets, when they are present (`CCNET_DATASETS`, default
//! `../shared/datasets` beside the repository). Each test says so and returns when a
//! dataset is missing.

use ccnet_host::complexity::{measure_item, ImageComplexity, Measures, Settings};
use ccnet_host::dataset::{load_pair, Dataset};
use ccnet_host::paths;

const ALL: [&str; 7] = [
    "isbi2012_em",
    "drive",
    "dsb2018_nuclei",
    "glas",
    "isic2017",
    "kvasir_seg",
    "busi",
];

fn open(name: &str) -> Option<Dataset> {
    match paths::dataset(name) {
        Ok(dir) => Some(Dataset::open(&dir, true).unwrap_or_else(|e| panic!("{name}: {e}"))),
        Err(msg) => {
            eprintln!("SKIPPED (real data absent): {msg}");
            None
        }
    }
}

/// Means of the first `n` images of a dataset.
fn sample_mean(ds: &Dataset, n: usize) -> Measures {
    let s = Settings::default();
    let per: Vec<ImageComplexity> = ds.items[..n.min(ds.items.len())]
        .iter()
        .map(|item| measure_item(item, &s).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    ccnet_host::complexity::mean_std(&per).0
}

#[test]
fn every_real_dataset_pairs_up_with_binary_masks() {
    for name in ALL {
        let Some(ds) = open(name) else { continue };
        assert!(!ds.items.is_empty(), "{name}");
        for item in &ds.items {
            let (img, mask) = load_pair(item, None).unwrap_or_else(|e| panic!("{e}"));
            assert!(img.channels == 1 || img.channels == 3);
            assert!(mask.data.contains(&1), "{}: empty mask", item.id);
        }
    }
}

#[test]
fn glands_are_more_complex_than_melanoma_as_in_the_paper() {
    // Paper Table 1: GlaS J 0.2401, B 0.5711; ISIC melanoma J 0.1505, B 0.3055.
    let (Some(gl), Some(me)) = (open("glas"), open("isic2017")) else {
        return;
    };
    let (g, m) = (sample_mean(&gl, 4), sample_mean(&me, 4));
    assert!(g.j > m.j && g.b > m.b, "glas {g:?}\nisic {m:?}");
    for v in [g, m] {
        assert!(v.j > 0.01 && v.j < 1.0 && v.b >= 0.0, "{v:?}");
    }
}

#[test]
fn mixed_gray_and_colour_dataset_is_measured() {
    let Some(ds) = open("dsb2018_nuclei") else {
        return;
    };
    let s = Settings::default();
    let mut seen = [false; 2];
    for item in &ds.items {
        let r = measure_item(item, &s).unwrap_or_else(|e| panic!("{e}"));
        let k = usize::from(r.channels == 3);
        if !seen[k] {
            seen[k] = true;
            assert!(r.measures.j > 0.0 && r.measures.j < 1.0, "{r:?}");
        }
        if seen == [true, true] {
            return;
        }
    }
    panic!("dsb2018_nuclei should hold both gray and colour images");
}
