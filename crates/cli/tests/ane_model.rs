//! `anetrain bench train --device ane-model` with the real binary: the predicted step
//! comes as the same JSON as a measured one, a probe report replaces the chip's figures,
//! and mistakes are clear errors. (The model's numbers are checked in
//! crates/train/tests/cost_model.rs.)

use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod common;
use common::{anetrain, failed_with};

fn stdout_json(out: &Output) -> Value {
    assert!(out.status.success(), "anetrain failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

const MODEL: [&str; 7] = ["bench", "train", "--device", "ane-model", "--model", "stories110m", "--json"];

#[test]
fn the_prediction_is_bench_trains_json_with_ms_per_step_predicted() {
    let dir = tempfile::tempdir().unwrap();
    let v = stdout_json(&anetrain(dir.path(), &MODEL));
    assert_eq!(v["device"], "ane-model");
    assert_eq!(v["predicted"], true);
    assert_eq!(v["chip"], "m4");
    assert_eq!(v["batch"], 1, "the seed's step: one sequence");
    let ms = v["ms_per_step"].as_f64().unwrap();
    let tps = v["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 256.0 / (ms / 1e3)).abs() < 1e-6 * tps, "{ms} ms/step, {tps} tokens/s");
    // Each fusion is priced; all together beat the pipeline as it runs.
    let unfused = v["unfused_ms_per_step"].as_f64().unwrap();
    assert_eq!(unfused, ms, "no --fusions: the schedule is the pipeline as it runs");
    assert!(v["all_fusions_ms_per_step"].as_f64().unwrap() < unfused);
    assert!(v["fusion_ms_per_step"]["async-dw"].as_f64().unwrap() < unfused);
    assert!(v["fusion_ms_per_step"]["wo"].is_null(), "wo does not apply to the dynamic pipeline");

    // Every key of a measured `bench train --json` is there.
    let real = stdout_json(&anetrain(
        dir.path(),
        &["bench", "train", "--model", "tiny", "--batch", "1", "--seq", "16", "--steps", "1", "--json"],
    ));
    for key in real.as_object().unwrap().keys() {
        assert!(v.get(key).is_some(), "the prediction lacks `{key}`");
    }
}

#[test]
fn the_text_shows_kernels_critical_path_peak_and_fusions() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(
        dir.path(),
        &[
            "bench",
            "train",
            "--device",
            "ane-model",
            "--model",
            "stories15m",
            "--pipeline",
            "static",
            "--chip",
            "m4max",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "not run on hardware",
        "M4 Max",
        "attention_backward_free",
        "critical path: main thread",
        "% of the 15.8 TFLOPS peak",
        "compile per step",
        "wo ",
        "conv ",
        "n/a: the static kernels already fuse it",
    ] {
        assert!(text.contains(needle), "no `{needle}` in:\n{text}");
    }
}

/// A probe report as `anetrain probe --json` writes it.
fn probe_json(dir: &Path, device: &str, tflops: f64, dispatch_us: f64) -> String {
    let report = serde_json::json!({
        "anetrain_version": "0.1.0", "os": "macos", "arch": "aarch64", "machine": "Apple M4",
        "device": device, "dialect": "ios18", "precision": "fp16",
        "results": [
            {"name": "peak", "status": "passed", "summary": "", "notes": [],
             "measurements": [{"name": "tflops", "value": tflops, "unit": "TFLOPS"}]},
            {"name": "dispatch-overhead", "status": "passed", "summary": "", "notes": [],
             "measurements": [{"name": "dispatch_overhead_us", "value": dispatch_us, "unit": "µs"},
                              {"name": "ns_per_element", "value": 0.1, "unit": "ns"}]},
        ],
    });
    let path = dir.join(format!("probe-{device}.json"));
    std::fs::write(&path, report.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_probe_report_replaces_the_published_figures() {
    let dir = tempfile::tempdir().unwrap();
    let published = stdout_json(&anetrain(dir.path(), &MODEL));
    // A chip half as fast with twice the dispatch cost predicts a slower step.
    let probe = probe_json(dir.path(), "ane", 7.9, 190.0);
    let mut args = MODEL.to_vec();
    args.extend(["--probe-json", &probe]);
    let probed = stdout_json(&anetrain(dir.path(), &args));
    assert_eq!(probed["ane_tflops_peak"], 7.9);
    assert!(probed["chip_figures"].as_str().unwrap().contains("probe-ane.json"));
    assert!(probed["ms_per_step"].as_f64().unwrap() > published["ms_per_step"].as_f64().unwrap());

    // A report from the CPU device describes no chip.
    let cpu = probe_json(dir.path(), "cpu", 0.2, 5.0);
    let mut args = MODEL.to_vec();
    args.extend(["--probe-json", &cpu]);
    failed_with(&anetrain(dir.path(), &args), &["probe-cpu.json", "`cpu` device"]);
    let mut args = MODEL.to_vec();
    args.extend(["--probe-json", "missing.json"]);
    failed_with(&anetrain(dir.path(), &args), &["--probe-json missing.json"]);
}

#[test]
fn mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let with = |extra: &[&str]| {
        let mut args = MODEL.to_vec();
        args.extend(extra);
        anetrain(dir.path(), &args)
    };
    failed_with(&with(&["--chip", "m9"]), &["--chip m9", "m4max"]);
    failed_with(&with(&["--fusions", "rmsnorm,flash"]), &["--fusions", "`flash`", "async-dw"]);
    failed_with(&with(&["--ane-extras"]), &["--ane-extras", "static"]);
    failed_with(&with(&["--seq", "0"]), &["--seq 0"]);
    failed_with(
        &anetrain(dir.path(), &["bench", "train", "--model", "tiny", "--chip", "m4"]),
        &["--chip", "--device ane-model"],
    );
}
