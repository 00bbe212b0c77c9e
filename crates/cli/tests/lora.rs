//! `anetrain train --lora` end to end: a run stopped and resumed ends with the adapters
//! and optimizer state of a run that never stopped (bit for bit, with dropout), the adapter exports as
//! a PEFT folder that `--init-lora` reads back exactly, and flag mistakes are named.

mod common;

use common::{anetrain, failed_with, ok};

/// Random tokens below the tiny preset's 512-token vocabulary, as a u16 shard.
fn write_shard(path: &std::path::Path) {
    let bytes: Vec<u8> =
        (0..4096u32).flat_map(|i| ((i.wrapping_mul(2654435761) >> 9) % 509 + 3).to_le_bytes()[..2].to_vec()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn train_args<'a>(ckpt: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "tiny",
        "--lora",
        "4",
        "--lora-targets",
        "q,v,down",
        "--data",
        "shard.bin",
        "--steps",
        steps,
        "--batch",
        "2",
        "--seq",
        "32",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--sample-steps",
        "0",
        "--quiet",
        "--device",
        "cpu",
        "--ckpt",
        ckpt,
        "--ckpt-every",
        "0",
        // Dropout's masks are drawn per step: the resumed run must draw the same.
        "--lora-dropout",
        "0.1",
    ]
}

#[test]
fn a_resumed_lora_run_ends_bit_identical_and_its_adapter_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_shard(&d.join("shard.bin"));
    ok(&anetrain(d, &train_args("straight/ckpt.bin", "4")));
    let mut first = train_args("split/ckpt.bin", "4");
    first.extend(["--stop-after", "2"]);
    ok(&anetrain(d, &first));
    let mut rest = train_args("split/ckpt.bin", "4");
    rest.push("--resume");
    ok(&anetrain(d, &rest));
    for run in ["straight", "split"] {
        ok(&anetrain(d, &["export", &format!("{run}/ckpt.bin"), "--lora-adapter", &format!("{run}/adapter")]));
    }
    let read = |run: &str| std::fs::read(d.join(run).join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(read("straight"), read("split"), "the resumed run's adapters differ");
    let straight = train::lora_trainer::load_lora_checkpoint(&d.join("straight/ckpt.bin")).unwrap();
    let split = train::lora_trainer::load_lora_checkpoint(&d.join("split/ckpt.bin")).unwrap();
    assert_eq!(straight.lora, split.lora);
    assert_eq!(straight.step, 4);
    // The base never moved: it is the preset's random init rounded to fp16.
    let mut base = llama::Params::init(&llama::Config::preset("tiny").unwrap(), 1337).unwrap();
    train::lora::round_base_to_fp16(&mut base);
    assert_eq!(straight.base, base);
    // The PEFT folder reads back to the same adapters.
    let back = train::peft::read_adapter(&d.join("straight/adapter"), base.config()).unwrap();
    assert_eq!(back, straight.lora);
    // --init-lora continues from it: a zero-step run's adapters are the folder's.
    let mut init = train_args("init/ckpt.bin", "0");
    init.retain(|a| *a != "--lora" && *a != "4" && *a != "--lora-targets" && *a != "q,v,down");
    init.extend(["--init-lora", "straight/adapter"]);
    ok(&anetrain(d, &init));
    assert_eq!(train::lora_trainer::load_lora_checkpoint(&d.join("init/ckpt.bin")).unwrap().lora, straight.lora);
}

#[test]
fn lora_flag_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_shard(&d.join("shard.bin"));
    let mut bad = train_args("a/ckpt.bin", "1");
    bad[6] = "q,attn";
    failed_with(&anetrain(d, &bad), &["--lora-targets", "`attn`"]);
    let mut bad = train_args("a/ckpt.bin", "1");
    bad[4] = "0";
    failed_with(&anetrain(d, &bad), &["--lora", "rank"]);
    let mut bad = train_args("a/ckpt.bin", "1");
    bad.extend(["--pipeline", "static"]);
    failed_with(&anetrain(d, &bad), &["--lora", "--pipeline"]);
    failed_with(&anetrain(d, &["export", "nowhere.bin", "--lora-adapter", "x"]), &["LoRA checkpoint"]);
}

/// `bench train --lora R --device ane-model` prices a LoRA step on the cost model beside
/// full fine-tuning: the LoRA plan evaluates 2 kernels per layer forward and 5 backward
/// (q,v: FFN backward, Woᵀ, attention backward, QKV backward, gradients) less layer 0's
/// QKV backward, against the dynamic pipeline's 6 per layer.
#[test]
fn bench_train_lora_on_the_ane_model_prints_both_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(
        dir.path(),
        &["bench", "train", "--lora", "8", "--model", "tiny", "--batch", "1", "--seq", "32", "--device", "ane-model"],
    );
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("predicted, not run on hardware"), "{text}");
    let l = llama::Config::preset("tiny").unwrap().n_layers;
    let evals = text.lines().find(|line| line.starts_with("| evaluations per step")).expect("an evaluations row");
    assert_eq!(evals, format!("| evaluations per step | {} | {} | |", 6 * l, 7 * l - 1), "{text}");
    let ms = text.lines().find(|line| line.starts_with("| ms/step (without AdamW)")).expect("a ms/step row");
    let cells: Vec<f64> = ms.split('|').filter_map(|c| c.trim().trim_end_matches('×').parse().ok()).collect();
    assert_eq!(cells.len(), 3, "{ms}");
    assert!(cells[0] > 0.0 && cells[1] > 0.0, "{ms}");
    assert!((cells[2] - cells[1] / cells[0]).abs() < 0.006, "the ratio is LoRA over full: {ms}");
    failed_with(
        &anetrain(
            dir.path(),
            &[
                "bench",
                "train",
                "--lora",
                "8",
                "--model",
                "tiny",
                "--seq",
                "32",
                "--device",
                "ane-model",
                "--chip",
                "z9",
            ],
        ),
        &["--chip z9"],
    );
}
