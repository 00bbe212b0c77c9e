//! `anetrain bench train` with the real binary: its JSON figures hang together, the
//! fastest round is reported, and `--pytorch` runs the comparison script through the
//! given interpreter (a stand-in here: CI has no torch) and reports what it measured.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod common;
use common::{anetrain, failed_with};

fn stdout_json(out: &Output) -> Value {
    assert!(out.status.success(), "anetrain failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

/// A stand-in for `python3`: checks it was handed the script on stdin and the model
/// file, then prints what bench_pytorch.py prints with --json.
fn fake_python(dir: &Path, body: &str) -> String {
    let path = dir.join("fake-python");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_string()
}

const TINY: [&str; 10] = ["bench", "train", "--model", "tiny", "--batch", "2", "--seq", "32", "--steps", "2"];

#[test]
fn json_figures_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = TINY.to_vec();
    args.extend(["--rounds", "2", "--json"]);
    let v = stdout_json(&anetrain(dir.path(), &args));
    assert_eq!(v["rounds"], 2);
    let ms = v["ms_per_step"].as_f64().unwrap();
    let tps = v["tokens_per_s"].as_f64().unwrap();
    assert!(ms > 0.0 && tps > 0.0);
    // tokens/s and ms/step describe the same round: 2 × 32 tokens per step.
    assert!((tps * ms / 1e3 - 64.0).abs() < 1e-6 * 64.0, "tokens/s {tps} and ms/step {ms} disagree");
    // The phases are parts of the step.
    let phases = v["phases_ms"].as_object().unwrap();
    assert_eq!(phases.len(), 8, "{phases:?}");
    let sum: f64 = phases.values().map(|p| p.as_f64().unwrap()).sum();
    assert!(sum > 0.0 && sum <= ms * 1.01, "phases add up to {sum} ms of a {ms} ms step");
    assert!(v["pytorch_measured_tokens_per_s"].is_null());
    // FLOPs per token × tokens/s is the achieved rate.
    let (per_token, gflops) = (v["flops_per_token"].as_f64().unwrap(), v["gflops"].as_f64().unwrap());
    assert!((per_token * tps / 1e9 - gflops).abs() < 1e-6 * gflops, "{per_token} FLOP/token at {tps} tokens/s");
    // The floor: a step's FLOPs at the GEMM peak plus the GEMM-free phases.
    let peak = v["gemm_peak_gflops"].as_f64().unwrap();
    let gemm_free: f64 =
        ["surface_io", "rmsnorm", "optimizer", "other"].iter().map(|p| phases[*p].as_f64().unwrap()).sum();
    let floor = per_token * 64.0 / (peak * 1e9) * 1e3 + gemm_free;
    let (got_floor, ceiling) = (v["floor_ms_per_step"].as_f64().unwrap(), v["ceiling_tokens_per_s"].as_f64().unwrap());
    assert!((got_floor - floor).abs() < 1e-6 * floor, "floor {got_floor} ms, recomputed {floor} ms");
    assert!((ceiling * got_floor / 1e3 - 64.0).abs() < 1e-6 * 64.0, "ceiling {ceiling} tokens/s");
}

#[test]
fn pytorch_comparison_runs_the_script_each_round_and_keeps_the_best() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.py"), "# llama2.c's model.py would be here\n").unwrap();
    // Each run appends to a log; the first prints 100 tokens/s, later ones 250.
    let python = fake_python(
        dir.path(),
        r#"script=$(cat)
case "$script" in *"llama2.c's own model.py"*) ;; *) echo "not the bench script" >&2; exit 9;; esac
case "$*" in *"--model-py"*"model.py"*"--model tiny"*"--batch 2"*"--seq 32"*"--json"*) ;; *) echo "args: $*" >&2; exit 9;; esac
echo run >> runs.log
if [ "$(wc -l < runs.log)" -eq 1 ]; then echo '{"tokens_per_s": 100.0}'; else echo '{"tokens_per_s": 250.0}'; fi"#,
    );
    let mut args = TINY.to_vec();
    args.extend(["--rounds", "3", "--json", "--pytorch", "model.py", "--python", &python]);
    let v = stdout_json(&anetrain(dir.path(), &args));
    assert_eq!(std::fs::read_to_string(dir.path().join("runs.log")).unwrap().lines().count(), 3);
    assert_eq!(v["pytorch_measured_runs"], serde_json::json!([100.0, 250.0, 250.0]));
    assert_eq!(v["pytorch_measured_tokens_per_s"], 250.0);
    assert_eq!(v["pytorch_compile"], false);

    // The text report says what 1.3× the best PyTorch figure (now 250 tokens/s) asks.
    let mut args = TINY.to_vec();
    args.extend(["--pytorch", "model.py", "--python", &python]);
    let out = anetrain(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vs PyTorch eager, measured now"), "{text}");
    assert!(text.contains("1.3× PyTorch (325 tokens/s) needs"), "{text}");
    assert!(text.contains("floor at the GEMM peak") && text.contains("the floor's ceiling is"), "{text}");

    // --pytorch-compile reaches the script as --compile.
    let python = fake_python(
        dir.path(),
        r#"cat > /dev/null
case "$*" in *"--compile"*) echo '{"tokens_per_s": 7.0}';; *) echo "no --compile in: $*" >&2; exit 9;; esac"#,
    );
    let mut args = TINY.to_vec();
    args.extend(["--json", "--pytorch", "model.py", "--python", &python, "--pytorch-compile"]);
    let v = stdout_json(&anetrain(dir.path(), &args));
    assert_eq!((v["pytorch_measured_tokens_per_s"].as_f64(), v["pytorch_compile"].as_bool()), (Some(7.0), Some(true)));
}

#[test]
fn bad_flags_and_failing_scripts_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = TINY.to_vec();
    args.extend(["--pytorch", "missing/model.py"]);
    failed_with(&anetrain(dir.path(), &args), &["--pytorch missing/model.py", "no such file"]);

    let mut args = TINY.to_vec();
    args.extend(["--pytorch-compile"]);
    let out = anetrain(dir.path(), &args);
    assert_eq!(out.status.code(), Some(1), "--pytorch-compile needs --pytorch");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pytorch"));

    let mut args = TINY.to_vec();
    args.extend(["--rounds", "0"]);
    failed_with(&anetrain(dir.path(), &args), &["--rounds"]);
    failed_with(&anetrain(dir.path(), &["bench", "gemm", "--seq", "256,0"]), &["--seq", "at least 1"]);
    failed_with(&anetrain(dir.path(), &["bench", "gemm", "--time-ms", "0"]), &["--time-ms", "at least 1"]);

    std::fs::write(dir.path().join("model.py"), "").unwrap();
    let python = fake_python(dir.path(), "cat > /dev/null; echo 'ModuleNotFoundError: torch' >&2; exit 1");
    let mut args = TINY.to_vec();
    args.extend(["--pytorch", "model.py", "--python", &python]);
    failed_with(&anetrain(dir.path(), &args), &["--pytorch", "ModuleNotFoundError: torch"]);

    let mut args = TINY.to_vec();
    args.extend(["--pytorch", "model.py", "--python", "no-such-python-here"]);
    failed_with(&anetrain(dir.path(), &args), &["--python no-such-python-here"]);
}
