//! Helpers shared by the CLI's integration tests: run the real binary, check a user
//! error. (Each test file compiles this module on its own, so some use only part of it.)
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `anetrain` binary in `dir`, quietly (no progress bars).
pub fn anetrain(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(args)
        .current_dir(dir)
        .env("ANETRAIN_QUIET", "1")
        .output()
        .expect("the anetrain binary runs")
}

/// A run that succeeded: its stdout (else a failure showing both streams).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "anetrain failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A user error: exit 1, a message mentioning every needle, no panic.
pub fn failed_with(out: &Output, needles: &[&str]) {
    failed_with_code(out, 1, needles);
}

/// An error with exit status `code`, a message mentioning every needle, no panic.
pub fn failed_with_code(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "expected exit {code}; stderr:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr does not mention `{n}`:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "a user error must not panic:\n{stderr}");
}
