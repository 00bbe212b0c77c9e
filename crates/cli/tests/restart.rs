//! The compile budget and the exec() restart, with the real binary: a run that restarts
//! itself mid-way (the CPU device's `--sim-compile-limit`) ends with the parameters of a
//! run that never restarted, and its statistics add up over the processes.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use train::checkpoint::Checkpoint;

mod common;
use common::{anetrain, failed_with};

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "anetrain failed ({}):\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tiny preset (4 layers: 20 static kernels per compile) on the built-in corpus.
fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--device",
        "cpu",
        "--quiet",
        "--batch",
        "2",
        "--seq",
        "32",
        "--sample-steps",
        "0",
        "--steps",
        "6",
    ];
    v.extend_from_slice(extra);
    v
}

fn events(telemetry: &Path) -> Vec<Value> {
    std::fs::read_to_string(telemetry).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

#[test]
fn a_run_that_restarts_ends_with_the_parameters_of_one_that_did_not() {
    for pipeline in ["static", "double-buffer"] {
        let dir = tempfile::tempdir().unwrap();
        let common = ["--pipeline", pipeline, "--eval-every", "3"];
        let mut straight = train_args(&common);
        straight.extend_from_slice(&["--ckpt", "a/ckpt.bin", "--telemetry", "a.jsonl"]);
        ok(&anetrain(dir.path(), &straight));
        // 45 compiles per process: the first 21 (20 weight-bearing kernels and the
        // weight-free attention backward) and one recompile of 20; the next step needs
        // another 20, so the process checkpoints and exec()s itself.
        let mut restarting = train_args(&common);
        restarting.extend_from_slice(&["--ckpt", "b/ckpt.bin", "--telemetry", "b.jsonl", "--sim-compile-limit", "45"]);
        let out = anetrain(dir.path(), &restarting);
        ok(&out);

        let a = Checkpoint::read(&dir.path().join("a/ckpt.bin")).unwrap();
        let b = Checkpoint::read(&dir.path().join("b/ckpt.bin")).unwrap();
        assert_eq!(b.meta["step"], 6);
        for name in ["params", "adam.m", "adam.v"] {
            let (x, y) = (a.array(name).unwrap(), b.array(name).unwrap());
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{pipeline}: {name} differs");
        }

        let (ea, eb) = (events(&dir.path().join("a.jsonl")), events(&dir.path().join("b.jsonl")));
        let restarts = of_kind(&eb, "restart");
        assert!(!restarts.is_empty(), "{pipeline}: no restart happened:\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(of_kind(&ea, "restart").is_empty());
        // Every process announces itself; each after the first resumes where the restart
        // event said the previous one stopped.
        let starts = of_kind(&eb, "start");
        assert_eq!(starts.len(), restarts.len() + 1, "{pipeline}");
        for (start, restart) in starts[1..].iter().zip(&restarts) {
            assert_eq!(start["resumed_from_step"], restart["step"], "{pipeline}");
            assert_eq!(start["pipeline"], pipeline);
        }
        // The same losses and validation losses, step by step.
        let values = |ev: &[Value], kind: &str, field: &str| -> Vec<f64> {
            of_kind(ev, kind).iter().map(|e| e[field].as_f64().unwrap()).collect()
        };
        assert_eq!(values(&ea, "step", "loss"), values(&eb, "step", "loss"), "{pipeline}");
        assert_eq!(values(&eb, "eval", "val_loss").len(), 2, "{pipeline}: evaluations after steps 3 and 6");
        assert_eq!(values(&ea, "eval", "val_loss"), values(&eb, "eval", "val_loss"), "{pipeline}");

        // The report covers the whole run, over every process.
        let report = &of_kind(&eb, "end")[0]["report"];
        assert_eq!(report["steps"], 6, "{pipeline}");
        assert_eq!(report["restarts"].as_u64().unwrap(), restarts.len() as u64, "{pipeline}");
        let step_seconds: f64 = values(&eb, "step", "ms").iter().sum::<f64>() / 1e3;
        let (train, compile) = (report["train_seconds"].as_f64().unwrap(), report["compile_seconds"].as_f64().unwrap());
        // Steps' wall times split into train time and the compiles they waited for;
        // totals of the last process alone would fall short of all six steps.
        assert!(train + compile >= 0.999 * step_seconds, "{pipeline}: {train} + {compile} < {step_seconds}");
        assert!(report["wall_seconds"].as_f64().unwrap() >= train + compile, "{pipeline}");
        let straight_compiles = of_kind(&ea, "end")[0]["report"]["compiles"].as_u64().unwrap();
        let restarted_compiles = report["compiles"].as_u64().unwrap();
        // Each new process compiles its first set and the weight-free kernel again.
        assert!(restarted_compiles > straight_compiles, "{pipeline}: {restarted_compiles} vs {straight_compiles}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().find(|l| l.trim_start().starts_with("restarts")).expect("the report's restarts line");
        assert_eq!(line.split_whitespace().last(), Some(restarts.len().to_string().as_str()), "{stderr}");
    }
}

#[test]
fn the_dynamic_pipeline_compiles_once_and_never_restarts() {
    let dir = tempfile::tempdir().unwrap();
    ok(&anetrain(dir.path(), &train_args(&["--sim-compile-limit", "6", "--telemetry", "t.jsonl"])));
    let ev = events(&dir.path().join("t.jsonl"));
    assert!(of_kind(&ev, "restart").is_empty());
    assert_eq!(of_kind(&ev, "end")[0]["report"]["compiles"], 6);
}

#[test]
fn budget_and_pipeline_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The first 21 compiles do not fit in 20.
    failed_with(&anetrain(d, &train_args(&["--pipeline", "static", "--sim-compile-limit", "20"])), &["compile budget"]);
    // 22 fit the first set, but not a step followed by an evaluation (20 more): the
    // evaluation runs in the next process, whose first set bakes the same parameters, so
    // the run finishes (tests/static_budget.rs checks every step count and budget).
    ok(&anetrain(d, &train_args(&["--pipeline", "static", "--sim-compile-limit", "22", "--eval-every", "1"])));
    failed_with(&anetrain(d, &train_args(&["--sim-compile-limit", "0", "--overwrite"])), &["--sim-compile-limit 0"]);
    failed_with(
        &anetrain(d, &train_args(&["--pipeline", "dynamic", "--ane-extras", "--overwrite"])),
        &["--ane-extras", "static"],
    );
    failed_with(&anetrain(d, &train_args(&["--ane-extras", "--overwrite"])), &["--ane-extras"]);
    let ane = ["train", "--device", "ane", "--sim-compile-ms", "5"];
    failed_with(&anetrain(d, &ane), &["--device cpu"]);
}

#[test]
fn bench_pipelines_prints_one_column_per_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(dir.path(), &["bench", "pipelines", "--steps", "3", "--batch", "1", "--seq", "32"]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| -> Vec<String> {
        let prefix = if name.is_empty() { "| |".to_string() } else { format!("| {name} |") };
        let line =
            stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no `{name}` row:\n{stdout}"));
        line.trim_matches('|').split('|').skip(1).map(|c| c.trim().to_string()).collect()
    };
    assert_eq!(row(""), ["dynamic", "static", "static+extras", "double-buffer"]);
    // The tiny preset has 4 layers: 5 kernels each per compile, and the extras add the
    // final norm and one classifier chunk. The dynamic pipeline compiles its 6 once; the
    // others compile a first set plus the weight-free kernels (1, or 2 with the extras),
    // then a set after each of the 2 later steps.
    assert_eq!(row("kernels per compile"), ["6 (once)", "20", "22", "20"]);
    assert_eq!(row("kernels compiled"), ["6", "61", "68", "61"]);
    assert_eq!(row("wall time").len(), 4);
}
