//! The real `anetrain` binary, run in temporary directories: training learns, resumes
//! bit-identically, survives a crash while checkpointing, exports, and refuses bad input
//! with a clear message and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use train::checkpoint::Checkpoint;

mod common;
use common::{anetrain, failed_with_code as failed_with, ok};

/// A small, fast training run on the built-in corpus.
const SMALL: &[&str] = &["train", "--device", "cpu", "--quiet", "--batch", "4", "--seq", "64", "--sample-steps", "0"];

fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = SMALL.to_vec();
    v.extend_from_slice(extra);
    v
}

fn losses(telemetry: &Path) -> Vec<f64> {
    std::fs::read_to_string(telemetry)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn params_of(path: &Path) -> Vec<f32> {
    Checkpoint::read(path).unwrap().array("params").unwrap().to_vec()
}

#[test]
fn the_built_in_run_learns() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(dir.path(), &train_args(&["--steps", "80", "--telemetry", "t.jsonl", "--eval-every", "40"]));
    ok(&out);
    let l = losses(&dir.path().join("t.jsonl"));
    assert_eq!(l.len(), 80);
    let first = l[0];
    let last: f64 = l[l.len() - 10..].iter().sum::<f64>() / 10.0;
    // A fresh 512-token model starts near ln(512) ≈ 6.2 (chance); 80 small steps (20 of
    // them warm-up) take it below 4.7, 1.5 nats better than chance.
    assert!((first - 512f64.ln()).abs() < 0.5, "first loss {first}");
    assert!(last < first - 1.5, "loss fell only from {first} to {last}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Efficiency Report"), "{stderr}");
    assert!(dir.path().join("runs/default/tokenizer.bin").exists());
    assert!(dir.path().join("runs/default/ckpt.bin").exists());
}

#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let straight = train_args(&["--steps", "12", "--ckpt", "a/ckpt.bin", "--ckpt-every", "5"]);
    ok(&anetrain(dir.path(), &straight));
    let first_half = train_args(&["--steps", "12", "--ckpt", "b/ckpt.bin", "--stop-after", "6"]);
    ok(&anetrain(dir.path(), &first_half));
    let at_six = Checkpoint::read(&dir.path().join("b/ckpt.bin")).unwrap();
    assert_eq!(at_six.meta["step"], 6);
    let second_half = train_args(&["--steps", "12", "--ckpt", "b/ckpt.bin", "--resume"]);
    ok(&anetrain(dir.path(), &second_half));
    let a = Checkpoint::read(&dir.path().join("a/ckpt.bin")).unwrap();
    let b = Checkpoint::read(&dir.path().join("b/ckpt.bin")).unwrap();
    assert_eq!(b.meta["step"], 12);
    for name in ["params", "adam.m", "adam.v"] {
        let (x, y) = (a.array(name).unwrap(), b.array(name).unwrap());
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} differs after resume");
    }
    assert_ne!(params_of(&dir.path().join("a/ckpt.bin")), at_six.array("params").unwrap());
}

#[test]
fn a_crash_while_checkpointing_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    ok(&anetrain(dir.path(), &train_args(&["--steps", "4", "--ckpt", "c/ckpt.bin"])));
    let before = params_of(&dir.path().join("c/ckpt.bin"));
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(train_args(&["--steps", "8", "--ckpt", "c/ckpt.bin", "--resume"]))
        .current_dir(dir.path())
        .env(train::checkpoint::FAIL_AFTER_ENV, "100000")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the injected crash must kill the process");
    assert!(String::from_utf8_lossy(&out.stderr).contains("crashing in the middle of writing"));
    // The half-written temporary file exists, the checkpoint is the old one, intact.
    let c = Checkpoint::read(&dir.path().join("c/ckpt.bin")).unwrap();
    assert_eq!(c.meta["step"], 4);
    assert_eq!(c.array("params").unwrap(), &before[..]);
    let names: Vec<String> = std::fs::read_dir(dir.path().join("c"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    // And training goes on from it.
    ok(&anetrain(dir.path(), &train_args(&["--steps", "8", "--ckpt", "c/ckpt.bin", "--resume"])));
    assert_eq!(Checkpoint::read(&dir.path().join("c/ckpt.bin")).unwrap().meta["step"], 8);
}

#[test]
fn an_exported_model_samples_like_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    ok(&anetrain(dir.path(), &train_args(&["--steps", "10", "--ckpt", "run/ckpt.bin"])));
    ok(&anetrain(dir.path(), &["export", "run/ckpt.bin", "--to", "out/model.bin"]));
    assert!(dir.path().join("out/tokenizer.bin").exists());
    let sample = |model: &str| {
        ok(&anetrain(
            dir.path(),
            &[
                "sample",
                "--model",
                model,
                "--prompt",
                "Once upon a time",
                "--temperature",
                "0",
                "--steps",
                "60",
                "--device",
                "cpu",
            ],
        ))
    };
    let from_ckpt = sample("run/ckpt.bin");
    assert!(from_ckpt.len() > 20, "sample: {from_ckpt:?}");
    assert_eq!(sample("out/model.bin"), from_ckpt);
    // model.bin write → read → write is byte-identical.
    ok(&anetrain(dir.path(), &["export", "out/model.bin", "--to", "again/model.bin"]));
    assert_eq!(
        std::fs::read(dir.path().join("out/model.bin")).unwrap(),
        std::fs::read(dir.path().join("again/model.bin")).unwrap()
    );
}

fn write_shard(path: &Path, tokens: &[u16]) {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A token id outside the vocabulary.
    let mut tokens: Vec<u16> = (0..4000).map(|i| 1 + (i % 300) as u16).collect();
    tokens[1234] = 600;
    write_shard(&d.join("bad.bin"), &tokens);
    let tok = d.join("tok.bin");
    ok(&anetrain(d, &train_args(&["--steps", "1", "--ckpt", "t/ckpt.bin"])));
    std::fs::copy(d.join("t/tokenizer.bin"), &tok).unwrap();
    let out = anetrain(d, &train_args(&["--data", "bad.bin", "--tokenizer", "tok.bin", "--steps", "2"]));
    failed_with(&out, 1, &["bad.bin", "600", "1234"]);
    // Data shorter than one window.
    write_shard(&d.join("short.bin"), &[1, 5, 6, 7]);
    let out = anetrain(d, &train_args(&["--data", "short.bin", "--tokenizer", "tok.bin", "--steps", "2"]));
    failed_with(&out, 1, &["short.bin"]);
    // A shard that is not there: named, with the system's reason said once.
    let out = anetrain(d, &train_args(&["--data", "absent.bin", "--tokenizer", "tok.bin", "--steps", "2"]));
    failed_with(&out, 1, &["absent.bin", "No such file"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // No positions per sequence.
    let out = anetrain(d, &["train", "--device", "cpu", "--quiet", "--seq", "0", "--steps", "1"]);
    failed_with(&out, 1, &["--seq", "at least 1"]);
    // --seq beyond the model's context (tiny: 128).
    let out = anetrain(d, &["train", "--device", "cpu", "--quiet", "--seq", "4096", "--steps", "1"]);
    failed_with(&out, 1, &["--seq", "4096", "128"]);
    // A corrupt checkpoint.
    std::fs::create_dir_all(d.join("x")).unwrap();
    let mut bytes = std::fs::read(d.join("t/ckpt.bin")).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(d.join("x/ckpt.bin"), &bytes).unwrap();
    let out = anetrain(d, &train_args(&["--steps", "2", "--ckpt", "x/ckpt.bin", "--resume"]));
    failed_with(&out, 1, &["x/ckpt.bin", "checksum"]);
    let out = anetrain(d, &["sample", "--model", "x/ckpt.bin", "--device", "cpu"]);
    failed_with(&out, 1, &["checksum"]);
    // A checkpoint whose model does not fit the tokenizer given.
    std::fs::write(d.join("small_tok.bin"), {
        let mut b = Vec::new();
        b.extend_from_slice(&5u32.to_le_bytes()); // max_token_length: "<unk>"
        for (i, p) in ["<unk>", "<s>", "</s>", "a"].iter().enumerate() {
            b.extend_from_slice(&(i as f32).to_le_bytes());
            b.extend_from_slice(&(p.len() as i32).to_le_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b
    })
    .unwrap();
    let out = anetrain(d, &["sample", "--model", "t/ckpt.bin", "--tokenizer", "small_tok.bin", "--device", "cpu"]);
    failed_with(&out, 1, &["4", "512"]);
}

#[test]
fn a_diverging_run_stops_and_names_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(
        dir.path(),
        &train_args(&[
            "--steps",
            "40",
            "--lr",
            "1e30",
            "--min-lr",
            "1e30",
            "--warmup",
            "0",
            "--clip",
            "0",
            "--ckpt-every",
            "1",
            "--ckpt",
            "n/ckpt.bin",
        ]),
    );
    failed_with(&out, 1, &["at step"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let step: u64 =
        stderr.split("at step ").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
    // The last good checkpoint is the one before the bad step, and it loads.
    let c = Checkpoint::read(&dir.path().join("n/ckpt.bin")).unwrap();
    assert_eq!(c.meta["step"].as_u64().unwrap(), step - 1);
    assert!(c.array("params").unwrap().iter().all(|v| v.is_finite()));
}

#[allow(dead_code)]
fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

/// `--ane-io multi` trains with one surface per input group and output, to the same
/// losses as the packed default (the CPU device binds in declaration order); on the ANE
/// it needs the io-convention probe's report, and says so.
#[test]
fn the_multi_surface_convention_trains_like_the_packed_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |io: &str, tel: &str| {
        ok(&anetrain(dir.path(), &train_args(&["--steps", "3", "--ane-io", io, "--telemetry", tel, "--overwrite"])));
        losses(&dir.path().join(tel))
    };
    assert_eq!(run("packed", "p.jsonl"), run("multi", "m.jsonl"));
    let out = anetrain(dir.path(), &["train", "--device", "ane", "--ane-io", "multi", "--ane-io-probe", "none.json"]);
    failed_with(
        &out,
        1,
        &["--ane-io multi: no io-convention report at none.json", "anetrain probe io-convention --device ane"],
    );
}
