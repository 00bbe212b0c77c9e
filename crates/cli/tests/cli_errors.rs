//! The hostile and careless user's table (issue 19): each row runs the real binary in
//! one temporary folder and states the exit code, phrases the message must contain (and
//! must not), and the files that must be byte-for-byte unchanged afterwards — nothing
//! lost, nothing aborted (exit 134), every refusal named.
//!
//! Every row failed on the binary before these fixes (`ANETRAIN_BIN=/path/to/old/anetrain
//! cargo test -p anetrain --test cli_errors` runs the table on another build).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llama::llama2c::{write_model, Version};
use llama::{Config, Params};

/// The binary under test: this build's, or `ANETRAIN_BIN`'s.
fn anetrain(dir: &Path, args: &[String]) -> Output {
    let bin =
        std::env::var_os("ANETRAIN_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_anetrain")), PathBuf::from);
    Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("ANETRAIN_QUIET", "1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the anetrain binary runs")
}

/// A short run on the built-in corpus: batch 2 (unless given) × 32 tokens.
const SMALL: &[&str] = &["train", "--device", "cpu", "--quiet", "--seq", "32", "--sample-steps", "0"];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn train(extra: &[&str]) -> Vec<String> {
    let batch: &[&str] = if extra.contains(&"--batch") { &[] } else { &["--batch", "2"] };
    strings(&[SMALL, batch, extra].concat())
}

fn ok(out: &Output) {
    assert!(out.status.success(), "setup failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

struct Case {
    what: &'static str,
    args: Vec<String>,
    code: i32,
    says: Vec<&'static str>,
    lacks: Vec<&'static str>,
    /// Files that must be exactly as they were before the command.
    keeps: Vec<&'static str>,
}

fn case(what: &'static str, args: Vec<String>, code: i32, says: &[&'static str], keeps: &[&'static str]) -> Case {
    Case { what, args, code, says: says.to_vec(), lacks: Vec::new(), keeps: keeps.to_vec() }
}

/// A MIL file whose `main` (opset `opset`) runs `body` on `x: [1, 4, 1, 2]` fp16 and returns `y`.
fn mil(opset: &str, body: &str) -> String {
    format!(
        "program(1.3)\n[buildInfo = dict<string, string>({{}})]\n{{\n    func main<{opset}>(tensor<fp16, [1, 4, 1, 2]> x) \
         {{\n        {body}\n    }} -> (y);\n}}\n"
    )
}

/// `n` bytes of `tokenizer.bin` that hold exactly its first `tokens` tokens.
fn tokens_prefix(bytes: &[u8], tokens: usize) -> usize {
    let mut at = 4;
    for _ in 0..tokens {
        let len = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    at
}

/// Builds the folder the table runs in: a 3-step checkpoint and its llama2.c export,
/// broken copies of both, MIL files and a text file.
fn setup(d: &Path) {
    ok(&anetrain(d, &train(&["--steps", "3", "--eval-every", "0", "--ckpt", "run/ckpt.bin"])));
    ok(&anetrain(d, &strings(&["export", "run/ckpt.bin", "--to", "m/model.bin", "--format-version", "1"])));
    let tokenizer = std::fs::read(d.join("m/tokenizer.bin")).unwrap();
    let model = std::fs::read(d.join("m/model.bin")).unwrap();

    // A model with one NaN weight (inside the token embedding, after the 256-byte header).
    std::fs::create_dir_all(d.join("nan")).unwrap();
    let mut nan = model.clone();
    nan[256 + 40..256 + 44].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(d.join("nan/model.bin"), nan).unwrap();
    std::fs::write(d.join("nan/tokenizer.bin"), &tokenizer).unwrap();

    // A valid 7 MB model whose header asks for a 128 GiB KV cache: 1024 layers ×
    // kv_dim 16 × 2 × seq_len 2^20 × 4 bytes.
    std::fs::create_dir_all(d.join("big")).unwrap();
    let config = Config::new(16, 16, 1024, 1, 1, 512, 1 << 20);
    write_model(&Params::zeros(&config).unwrap(), d.join("big/model.bin"), Version::V1).unwrap();
    std::fs::write(d.join("big/tokenizer.bin"), &tokenizer).unwrap();

    // Broken tokenizers: a NaN score, max_token_length 0xFFFFFFFF, cut after 100 tokens,
    // and a SentencePiece model (a protobuf: field 1, a piece whose field 1 is `<unk>`).
    let mut t = tokenizer.clone();
    t[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(d.join("nan-score.bin"), t).unwrap();
    let mut t = tokenizer.clone();
    t[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(d.join("max-len.bin"), t).unwrap();
    std::fs::write(d.join("cut.bin"), &tokenizer[..tokens_prefix(&tokenizer, 100)]).unwrap();
    std::fs::write(d.join("sp.model"), b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02").unwrap();

    // MIL: a matmul whose output is [1, 1, 200000, 200000] fp32 (160 GB).
    std::fs::create_dir_all(d.join("huge")).unwrap();
    std::fs::write(
        d.join("huge/model.mil"),
        "program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n    func main<ios18>(tensor<fp32, [1, 1, 200000, 1]> a, \
         tensor<fp32, [1, 1, 1, 200000]> b) {\n        tensor<fp32, [1, 1, 200000, 200000]> y = matmul(x = a, y = b)\
         [name = string(\"y\")];\n    } -> (y);\n}\n",
    )
    .unwrap();
    let relu = r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x)[name = string("y")];"#;
    std::fs::write(d.join("opset.mil"), mil("ios99", relu)).unwrap();
    let two = r#"fp16 two = const()[name = string("two"), val = fp16(1e99999)];
        tensor<fp16, [1, 4, 1, 2]> y = mul(x = x, y = two)[name = string("y")];"#;
    std::fs::write(d.join("inf.mil"), mil("ios18", two)).unwrap();
    std::fs::write(
        d.join("softmax.mil"),
        mil("ios18", r#"tensor<fp16, [1, 4, 1, 2]> y = softmax(x = x)[name = string("y")];"#),
    )
    .unwrap();

    std::fs::write(d.join("stories.txt"), "Once upon a time there was a cat.\n\nThe cat sat on a mat.\n").unwrap();
    std::fs::write(d.join("tok.bin"), b"an existing file").unwrap();
    std::fs::create_dir_all(d.join("shards")).unwrap();
}

fn cases(root: bool) -> Vec<Case> {
    let ckpt = &["--ckpt", "run/ckpt.bin"];
    let resume = |extra: &[&str]| train(&[&["--resume"], &ckpt[..], extra].concat());
    let sample = |model: &str, extra: &[&str]| {
        strings(&[&["sample", "--device", "cpu", "--model", model, "--steps", "4", "--seed", "1"], extra].concat())
    };
    let mut cases = vec![
        // 1. An existing checkpoint is not replaced silently.
        case(
            "train over an existing checkpoint",
            train(&["--steps", "2", "--ckpt", "run/ckpt.bin"]),
            1,
            &["run/ckpt.bin already exists", "step 3 of 3", "--resume", "--overwrite"],
            &["run/ckpt.bin"],
        ),
        // 2. An unwritable checkpoint path is found before training.
        Case {
            lacks: vec!["training tiny"],
            ..case(
                "--ckpt is a directory",
                train(&["--steps", "2", "--ckpt", "run"]),
                1,
                &["is a directory"],
                &["run/ckpt.bin"],
            )
        },
        // 3. tokenizer train refuses an existing --out, as train refuses an existing --ckpt.
        case(
            "tokenizer train over an existing file",
            strings(&["tokenizer", "train", "--in", "stories.txt", "--out", "tok.bin", "--vocab", "300"]),
            1,
            &["tok.bin already exists", "--overwrite"],
            &["tok.bin"],
        ),
        // 6. Sizes from input are checked before anything is allocated: exit 1, not 134.
        case(
            "train --batch 100000000",
            train(&["--steps", "2", "--batch", "100000000", "--ckpt", "b/ckpt.bin"]),
            1,
            &["--batch 100000000", "available"],
            &[],
        ),
        case(
            "mil run of a 160 GB matmul",
            strings(&["mil", "run", "huge", "--out", "o"]),
            1,
            &["function `main`: its tensors: needs", "available"],
            &[],
        ),
        case(
            "sample a model whose header asks for a 128 GiB KV cache",
            sample("big/model.bin", &[]),
            1,
            &["n_layers 1024, seq_len 1048576", "needs 137438953472 bytes", "available"],
            &[],
        ),
        // 7. Resuming with flags that contradict the checkpoint.
        case(
            "--resume with another --batch",
            resume(&["--batch", "4"]),
            1,
            &["--batch 4", "trained with --batch 2", "--overwrite"],
            &["run/ckpt.bin"],
        ),
        case(
            "--resume with another --model",
            resume(&["--model", "stories15m"]),
            1,
            &["--model stories15m", "holds another model"],
            &["run/ckpt.bin"],
        ),
        case(
            "--resume --steps below the checkpoint's step",
            resume(&["--steps", "2"]),
            1,
            &["--steps 2", "at step 3 already"],
            &["run/ckpt.bin"],
        ),
        // 8. Non-finite weights and invalid tokenizer fields, located.
        case(
            "sample a model with a NaN weight",
            sample("nan/model.bin", &[]),
            1,
            &["nan/model.bin", "holds NaN at element", "weights must be finite"],
            &[],
        ),
        case(
            "a tokenizer with a NaN score",
            sample("m/model.bin", &["--tokenizer", "nan-score.bin"]),
            1,
            &["nan-score.bin", "token 0", "score NaN"],
            &[],
        ),
        case(
            "a tokenizer with max_token_length 0xFFFFFFFF",
            sample("m/model.bin", &["--tokenizer", "max-len.bin"]),
            1,
            &["max-len.bin", "max_token_length is 4294967295"],
            &[],
        ),
        // 9. MIL that is not MIL.
        case("mil check of opset ios99", strings(&["mil", "check", "opset.mil"]), 1, &["opset.mil:4:5", "ios99"], &[]),
        case(
            "mil check of fp16(1e99999)",
            strings(&["mil", "check", "inf.mil"]),
            1,
            &["inf.mil:5:", "out of range"],
            &[],
        ),
        case(
            "mil check of a softmax without axis",
            strings(&["mil", "check", "softmax.mil"]),
            1,
            &["softmax.mil:5:9", "`softmax` needs argument `axis`"],
            &[],
        ),
        // 10. Messages that say what is wrong.
        case(
            "--data is a directory",
            train(&["--steps", "2", "--data", "shards", "--ckpt", "d/ckpt.bin"]),
            1,
            &["shards", "is a directory", "*.bin"],
            &[],
        ),
        case(
            "a SentencePiece model as --tokenizer",
            sample("m/model.bin", &["--tokenizer", "sp.model"]),
            1,
            &["sp.model", "SentencePiece", "tokenizer.bin"],
            &[],
        ),
        case(
            "a truncated tokenizer",
            sample("m/model.bin", &["--tokenizer", "cut.bin"]),
            1,
            &["tokenizer cut.bin", "100"],
            &[],
        ),
        Case {
            lacks: vec!["val loss"],
            ..case(
                "--eval-batches 0 evaluates nothing",
                train(&["--steps", "2", "--eval-every", "1", "--eval-batches", "0", "--ckpt", "e/ckpt.bin"]),
                0,
                &["checkpoint: e/ckpt.bin (step 2)"],
                &[],
            )
        },
        // Last, as it moves the checkpoint on: flags that may change are applied, with a note.
        case(
            "--resume with a longer run and another learning rate",
            resume(&["--steps", "4", "--lr", "0.001"]),
            0,
            &[
                "training run/ckpt.bin",
                "--steps 4",
                "learning-rate schedule changes",
                "checkpoint: run/ckpt.bin (step 4)",
            ],
            &[],
        ),
    ];
    // A read-only folder stops only a user who is not root.
    if !root {
        cases.insert(
            2,
            Case {
                lacks: vec!["training tiny"],
                ..case(
                    "--ckpt in a read-only folder",
                    train(&["--steps", "2", "--ckpt", "ro/ckpt.bin"]),
                    1,
                    &["ro/ckpt.bin", "cannot write a checkpoint there"],
                    &[],
                )
            },
        );
    }
    cases
}

#[test]
fn every_bad_input_is_refused_by_name_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // Root writes through read-only permissions.
    let probe = d.join("ro");
    std::fs::create_dir_all(&probe).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let root = std::fs::write(probe.join("x"), b"").is_ok();

    let mut failures = Vec::new();
    for c in cases(root) {
        let before: Vec<Vec<u8>> = c.keeps.iter().map(|f| std::fs::read(d.join(f)).unwrap()).collect();
        let out = anetrain(d, &c.args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut wrong = Vec::new();
        if out.status.code() != Some(c.code) {
            wrong.push(format!("exit {:?}, expected {}", out.status.code(), c.code));
        }
        if stderr.contains("panicked") || stderr.contains("memory allocation of") {
            wrong.push("aborted".into());
        }
        wrong.extend(c.says.iter().filter(|n| !stderr.contains(*n)).map(|n| format!("does not say `{n}`")));
        wrong.extend(c.lacks.iter().filter(|n| stderr.contains(*n)).map(|n| format!("says `{n}`")));
        for (f, bytes) in c.keeps.iter().zip(before) {
            if std::fs::read(d.join(f)).ok().as_ref() != Some(&bytes) {
                wrong.push(format!("{f} changed or went"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {}\n  anetrain {}\n  stderr: {}",
                c.what,
                wrong.join("; "),
                c.args.join(" "),
                stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}
