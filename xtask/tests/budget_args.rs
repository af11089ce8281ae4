//! `cargo xtask build-for-budget` refuses malformed budgets before doing anything.

use std::process::Command;

#[test]
fn malformed_budgets_are_clear_errors() {
    for bad in ["1mb", "abc", "0MB", "1.5.2MB"] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["build-for-budget", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        assert!(err.contains("1MB = 10^6 bytes"), "{bad}: {err}");
    }
}

#[test]
fn help_is_printed_and_succeeds() {
    for args in [
        &["build-for-budget", "--help"][..],
        &["build-for-budget", "1MB", "-h"],
        &["--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        assert!(text.contains("usage: cargo xtask"), "{args:?}: {text}");
        assert!(out.stderr.is_empty(), "{args:?}");
    }
}
