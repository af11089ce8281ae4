//! `ccnet arch` end to end, and the clear errors for bad architecture arguments.

mod common;

use common::ccnet;

#[test]
fn reports_the_paper_base_sizes() {
    for (arch, log) in [("unet", 7.492), ("fcn", 7.552), ("cumed", 6.887)] {
        let (ok, out, err) = ccnet(&["arch", arch, "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let got = v["log10_params"].as_f64().unwrap();
        assert!((got - log).abs() < 0.02, "{arch}: {got}");
        let p = v["params"].as_u64().unwrap();
        assert_eq!(v["weight_bytes_f32"].as_u64().unwrap(), 4 * p);
        assert_eq!(v["weight_bytes_f16"].as_u64().unwrap(), 2 * p);
        assert_eq!(v["weight_bytes_int8"].as_u64().unwrap(), p);
        assert!(v["macs"].as_u64().unwrap() > p);
        assert_eq!(
            v["peak_activation_bytes_f32"].as_u64().unwrap(),
            4 * v["peak_activation_bytes_int8"].as_u64().unwrap()
        );
    }
}

#[test]
fn table_output_scales_with_alpha() {
    let (ok, out, _) = ccnet(&[
        "arch",
        "unet",
        "--alpha",
        "1/8",
        "--input",
        "128x128",
        "--channels",
        "3",
    ]);
    assert!(ok);
    assert!(out.contains("unet at alpha 1/8, input 128x128x3"), "{out}");
    let json = |a: &str| -> u64 {
        let (_, out, _) = ccnet(&["arch", "unet", "--alpha", a, "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["params"]
            .as_u64()
            .unwrap()
    };
    let (p1, p8) = (json("1"), json("0.125"));
    let ratio = p1 as f64 / p8 as f64;
    assert!((60.0..64.5).contains(&ratio), "ratio {ratio}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["arch", "resnet"], "unknown architecture"),
        (&["arch", "unet", "--alpha", "0"], "greater than 0"),
        (&["arch", "unet", "--alpha", "-1/2"], "greater than 0"),
        (&["arch", "unet", "--alpha", "3/2"], "at most 1"),
        (&["arch", "unet", "--alpha", "x"], "fraction like 1/8"),
        (
            &["arch", "unet", "--alpha", "1/256"],
            "rounds a layer of 64 channels to zero",
        ),
        (&["arch", "unet", "--input", "100x100"], "multiple of 16"),
        (&["arch", "unet", "--input", "0x64"], "expected a size"),
        (&["arch", "unet", "--classes", "1"], "at least 2 classes"),
        (&["arch", "unet", "--channels", "0"], "at least 1 channel"),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = ccnet(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
