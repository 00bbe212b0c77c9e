//! anetrain's ANE code path end to end, with the real binary, against the emulated
//! frameworks (`crates/ane-emu`, loaded through `ANETRAIN_ANE_FRAMEWORKS`): `devices`,
//! `probe`, `train` with every pipeline (the static one restarting itself when the
//! emulated budget runs out) and `sample`. The emulation runs each program on the CPU
//! device in fp16-rounding mode, so losses and samples equal the CPU device's fp16 mode
//! exactly. Each process ends with the emulation's leak check: a leaked object or surface
//! makes it exit with status 3, which fails these tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::ok;

/// The emulation library, built because it is a dev-dependency of this package, in
/// `deps/` (first: a copy next to the binary may be from an older `cargo build`).
fn library() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_anetrain"));
    let dir = bin.parent().unwrap();
    let name = format!("{}ane_emu{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    [dir.join("deps").join(&name), dir.join(&name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found beside {}: build it with `cargo build -p ane-emu`", bin.display()))
}

/// Runs `anetrain` in `dir`; with `ane`, against the emulation, with the model
/// directories in `dir/tmp`.
fn run(dir: &Path, ane: bool, args: &[&str]) -> Output {
    run_with(dir, ane, args, &[])
}

/// `run` with environment variables added (the emulation's settings).
fn run_with(dir: &Path, ane: bool, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anetrain"));
    cmd.args(args).current_dir(dir).env("ANETRAIN_QUIET", "1").envs(env.iter().copied());
    if ane {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        cmd.env("ANETRAIN_ANE_FRAMEWORKS", library()).env("TMPDIR", tmp);
    }
    cmd.output().expect("the anetrain binary runs")
}

fn events(telemetry: &Path) -> Vec<Value> {
    std::fs::read_to_string(telemetry).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn losses(telemetry: &Path) -> Vec<f64> {
    events(telemetry).iter().filter(|e| e["event"] == "step").map(|e| e["loss"].as_f64().unwrap()).collect()
}

/// The tiny preset on the built-in corpus, small batches.
const TRAIN: &[&str] = &["train", "--quiet", "--batch", "2", "--seq", "32", "--sample-steps", "0", "--eval-every", "0"];

#[test]
fn devices_and_probes_run_on_the_emulated_ane() {
    let dir = tempfile::tempdir().unwrap();
    let listing = ok(&run(dir.path(), true, &["devices"]));
    assert!(listing.contains("ane   available  Apple Neural Engine, emulated by "), "{listing}");
    assert!(listing.contains("not run on hardware"), "{listing}");
    // On the reference's chips several surfaces fail (0x1d) and so do the io-order and
    // io-convention probes' multi-surface variants, as they should: the emulation's
    // default. Every probe passes on an emulated chip that takes several surfaces.
    let args = ["probe", "--device", "ane", "--iterations", "1", "--json", "probes.json"];
    let strict = run(dir.path(), true, &args);
    let table = String::from_utf8_lossy(&strict.stdout).into_owned();
    let io_order = table.lines().find(|l| l.starts_with("io-order")).unwrap_or_else(|| panic!("{table}"));
    assert!(io_order.contains("failed"), "{table}");
    assert!(table.contains("multi-input requests are rejected"), "{table}");
    let out = run_with(dir.path(), true, &args, &[("ANETRAIN_ANE_EMU_REJECT", "small-surface,unequal-sizes,budget")]);
    let table = ok(&out);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("probes.json")).unwrap()).unwrap();
    assert_eq!(report["device"], "ane", "{table}");
    assert!(table.contains(" passed, 0 failed, "), "probes failed on the emulation:\n{table}");
    // The compile-limit probe's child meets the emulated budget: compile 120 fails.
    let limit = table.lines().find(|l| l.starts_with("compile-limit")).unwrap_or_else(|| panic!("{table}"));
    assert!(limit.contains("119"), "{table}");
}

#[test]
fn every_pipeline_trains_on_the_emulated_ane_with_the_cpu_fp16_losses() {
    let runs: [(&str, &[&str]); 4] = [
        ("dynamic", &["--pipeline", "dynamic"]),
        ("static", &["--pipeline", "static"]),
        ("extras", &["--pipeline", "static", "--ane-extras"]),
        ("double-buffer", &["--pipeline", "double-buffer"]),
    ];
    for (label, pipeline) in runs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // 8 steps of the static pipelines need more than one process's 119 compiles.
        let steps = ["--steps", "8"];
        let mut cpu = TRAIN.to_vec();
        cpu.extend_from_slice(&["--device", "cpu", "--precision", "fp16", "--ckpt", "cpu/ckpt.bin"]);
        cpu.extend_from_slice(&["--telemetry", "cpu.jsonl"]);
        cpu.extend_from_slice(&steps);
        cpu.extend_from_slice(pipeline);
        ok(&run(d, false, &cpu));
        let mut ane = TRAIN.to_vec();
        ane.extend_from_slice(&["--device", "ane", "--ckpt", "ane/ckpt.bin", "--telemetry", "ane.jsonl"]);
        ane.extend_from_slice(&steps);
        ane.extend_from_slice(pipeline);
        ok(&run(d, true, &ane));
        let (want, got) = (losses(&d.join("cpu.jsonl")), losses(&d.join("ane.jsonl")));
        assert_eq!(want.len(), 8, "{label}");
        assert_eq!(got, want, "{label}: the emulated ANE's losses differ from the CPU device's fp16 ones");
        if label != "dynamic" {
            let restarts = events(&d.join("ane.jsonl")).iter().filter(|e| e["event"] == "restart").count();
            assert!(restarts >= 1, "{label}: expected an exec() restart when the compile budget ran out");
        }
        // Every model directory was removed.
        let left: Vec<_> = std::fs::read_dir(d.join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "{label}: model directories left behind: {left:?}");
    }
}

/// llama2.c's stories260K (../shared/fixtures), greedy: the decode kernels on the
/// emulated ANE give the CPU device's fp16 text.
#[test]
fn sampling_on_the_emulated_ane_matches_the_cpu_in_fp16() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    assert!(fixtures.join("stories260K.bin").exists(), "the fixtures folder {} is missing", fixtures.display());
    let (model, tokenizer) = (fixtures.join("stories260K.bin"), fixtures.join("tok512.bin"));
    let dir = tempfile::tempdir().unwrap();
    let sample = |device: &[&str], ane: bool| {
        let mut args = vec!["sample", "--model", model.to_str().unwrap(), "--tokenizer", tokenizer.to_str().unwrap()];
        args.extend_from_slice(&["--temperature", "0", "--steps", "48"]);
        args.extend_from_slice(device);
        ok(&run(dir.path(), ane, &args))
    };
    let cpu = sample(&["--device", "cpu", "--precision", "fp16"], false);
    let ane = sample(&["--device", "ane"], true);
    assert!(cpu.split_whitespace().count() > 10, "{cpu}");
    assert_eq!(ane, cpu);
}
