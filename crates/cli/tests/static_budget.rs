//! The static pipeline under a tight compile budget finishes whatever its step count: a
//! step and the evaluation after it may land in different processes (issue 19, item 5:
//! `--steps 12 --sim-compile-limit 40` used to stop at the last step with "compile budget
//! (19 left) cannot fit one step").
//!
//! Every step count from 1 to 15 at budgets 21 (the tiny preset's first 20 + 1 kernels:
//! one step, then a restart), 40 and 119 (the ANE's reported budget) must end at its last
//! step with its final evaluation, and the three budgets must agree bit for bit: the
//! restarts change nothing in the numbers.

use std::path::Path;

use serde_json::Value;
use train::checkpoint::Checkpoint;

mod common;
use common::anetrain;

const BUDGETS: [&str; 3] = ["21", "40", "119"];

fn events(telemetry: &Path) -> Vec<Value> {
    std::fs::read_to_string(telemetry).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// What a run ended with: its step losses, its evaluations (step, loss) and its parameters.
type Outcome = (Vec<f64>, Vec<(u64, f64)>, Vec<u32>);

fn run(dir: &Path, steps: u64, budget: &str) -> Outcome {
    let name = format!("s{steps}-b{budget}");
    let ckpt = format!("{name}/ckpt.bin");
    let telemetry = format!("{name}.jsonl");
    let steps_arg = steps.to_string();
    let args = [
        "train",
        "--device",
        "cpu",
        "--quiet",
        "--batch",
        "1",
        "--seq",
        "16",
        "--sample-steps",
        "0",
        "--eval-batches",
        "1",
        "--pipeline",
        "static",
        "--seed",
        "5",
        "--steps",
        &steps_arg,
        "--sim-compile-limit",
        budget,
        "--ckpt",
        &ckpt,
        "--telemetry",
        &telemetry,
        "--data",
        "shards/stories.bin",
        "--tokenizer",
        "tok.bin",
    ];
    let out = anetrain(dir, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed ({}):\n{stderr}", out.status);
    let ev = events(&dir.join(&telemetry));
    let of = |kind: &'static str| ev.iter().filter(move |e| e["event"] == kind);
    let losses: Vec<f64> = of("step").map(|e| e["loss"].as_f64().unwrap()).collect();
    let evals: Vec<(u64, f64)> =
        of("eval").map(|e| (e["step"].as_u64().unwrap(), e["val_loss"].as_f64().unwrap())).collect();
    assert_eq!(losses.len() as u64, steps, "{name}: every step ran once:\n{stderr}");
    assert_eq!(evals.last().map(|e| e.0), Some(steps), "{name}: the final evaluation ran:\n{stderr}");
    let ck = Checkpoint::read(&dir.join(&ckpt)).unwrap();
    assert_eq!(ck.meta["step"], steps, "{name}");
    assert_eq!(ck.meta["eval_pending"], false, "{name}");
    (losses, evals, ck.array("params").unwrap().iter().map(|v| v.to_bits()).collect())
}

/// A small pretokenized corpus and its tokenizer: each of the ~300 processes then starts
/// in a fraction of a second (the built-in corpus is generated and encoded anew by each).
fn small_corpus(d: &Path) {
    let stories = train::corpus::generate(300, 5);
    std::fs::write(d.join("stories.txt"), stories.join("\n\n")).unwrap();
    for args in [
        &["tokenizer", "train", "--vocab", "300", "--in", "stories.txt", "--out", "tok.bin"][..],
        &["data", "pretokenize", "--quiet", "--tokenizer", "tok.bin", "--in", "stories.txt", "--out", "shards"],
    ] {
        let out = anetrain(d, args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn every_step_count_finishes_at_every_budget_with_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_corpus(d);
    // The budgets in parallel, the step counts one after the other.
    let outcomes: Vec<Vec<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            BUDGETS.iter().map(|b| s.spawn(move || (1..=15).map(|n| run(d, n, b)).collect())).collect();
        handles.into_iter().map(|h| h.join().expect("a budget's runs")).collect()
    });
    for n in 0..15 {
        for (b, outcome) in BUDGETS.iter().zip(&outcomes).skip(1) {
            let (reference, this) = (&outcomes[0][n], &outcome[n]);
            assert_eq!(this.0, reference.0, "{} steps: losses at budget {b} differ from budget 21", n + 1);
            assert_eq!(this.1, reference.1, "{} steps: evaluations at budget {b} differ", n + 1);
            assert!(this.2 == reference.2, "{} steps: parameters at budget {b} differ", n + 1);
        }
    }
}
