//! Bounded fuzzing of everything that reads user files: the MIL parser and validator,
//! the llama2.c model reader, the tokenizer reader and the checkpoint reader (with its
//! checksum recomputed, so that mutations reach the structure behind it). Each target
//! mutates valid seed files for `ANETRAIN_FUZZ_SECONDS` seconds (default 2; CI runs 60),
//! the four in parallel. A loader may refuse an input, never panic or abort.
//!
//! Why not cargo-fuzz here: it needs nightly flags, a C++ build of libFuzzer and an
//! install of several minutes on every CI machine; fuzz/ keeps it for long local runs of
//! the MIL parser. This stable, dependency-free loop (seeds × random mutations: bit flips,
//! interesting integers and floats, truncation, insertion, splicing of MIL tokens) runs
//! with `cargo test`. A failing input is written to the test's temporary folder and named.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use device::{cpu::CpuDevice, Precision};
use llama::llama2c::{read_model, write_model, Version};
use llama::{Config, Params, Tokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use train::checkpoint::Checkpoint;
use train::data::Dataset;
use train::trainer::{checkpoint_summary, load_params, TrainConfig, Trainer};

fn budget() -> Duration {
    let secs = std::env::var("ANETRAIN_FUZZ_SECONDS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    2,
    0x7F,
    0xFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x7FC0_0000, /* NaN */
    0x7F80_0000, /* inf */
];

/// One random mutation of `data` (a few of the kinds libFuzzer uses).
fn mutate(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, tokens: &[&str]) {
    let n = data.len();
    match rng.gen_range(0..8) {
        0 if n > 0 => {
            let i = rng.gen_range(0..n);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if n > 0 => {
            let i = rng.gen_range(0..n);
            data[i] = rng.gen();
        }
        2 if n >= 4 => {
            let i = rng.gen_range(0..n - 3);
            let v = INTERESTING_U32[rng.gen_range(0..INTERESTING_U32.len())];
            data[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        3 if n > 0 => data.truncate(rng.gen_range(0..n)),
        4 => {
            let i = rng.gen_range(0..=n);
            let extra: Vec<u8> = (0..rng.gen_range(1..16)).map(|_| rng.gen()).collect();
            data.splice(i..i, extra);
        }
        5 if n > 1 => {
            // Remove a chunk.
            let i = rng.gen_range(0..n);
            let j = rng.gen_range(i..=n.min(i + 64));
            data.drain(i..j);
        }
        6 if n > 1 => {
            // Duplicate a chunk somewhere else.
            let i = rng.gen_range(0..n);
            let j = rng.gen_range(i..=n.min(i + 64));
            let chunk = data[i..j].to_vec();
            let at = rng.gen_range(0..=data.len());
            data.splice(at..at, chunk);
        }
        _ if !tokens.is_empty() => {
            let t = tokens[rng.gen_range(0..tokens.len())].as_bytes().to_vec();
            let i = rng.gen_range(0..=n);
            data.splice(i..i, t);
        }
        _ => {}
    }
}

/// Runs `check` on mutants of `seeds` until the budget is spent; returns the inputs run.
fn fuzz(name: &str, seeds: &[Vec<u8>], tokens: &[&str], out: &Path, check: impl Fn(&[u8])) -> u64 {
    let deadline = Instant::now() + budget();
    let mut rng = ChaCha8Rng::seed_from_u64(name.len() as u64 * 7919);
    let mut runs = 0;
    while Instant::now() < deadline {
        let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
        for _ in 0..rng.gen_range(1..6) {
            mutate(&mut rng, &mut data, tokens);
        }
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            let path = out.join(format!("crash-{name}.bin"));
            std::fs::write(&path, &data).unwrap();
            panic!("{name}: the loader panicked on the input saved as {}", path.display());
        }
        runs += 1;
    }
    runs
}

fn mil_seeds() -> (Vec<Vec<u8>>, Vec<String>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut seeds = Vec::new();
    for entry in std::fs::read_dir(root.join("corpus/parse")).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("seed-") {
            seeds.push(std::fs::read(entry.path()).unwrap());
        }
    }
    assert!(!seeds.is_empty(), "no seeds in fuzz/corpus/parse");
    let dict = std::fs::read_to_string(root.join("mil.dict")).unwrap();
    let tokens = dict
        .lines()
        .filter_map(|l| l.strip_prefix('"').and_then(|l| l.strip_suffix('"')))
        .map(|t| t.replace("\\\"", "\""))
        .collect();
    (seeds, tokens)
}

fn tiny_config() -> Config {
    Config::new(8, 16, 2, 2, 1, 300, 16)
}

/// A checkpoint of a 2-step run of a tiny model, as `anetrain train` writes them.
fn checkpoint_seed(dir: &Path) -> Vec<u8> {
    let config = tiny_config();
    let device = CpuDevice::new(Precision::Fp32);
    let tokens: Vec<u16> = (0..2000u32).map(|i| (i * 37 % 300) as u16).collect();
    let splits = Dataset::split_tokens("fuzz", tokens, 0.1, config.vocab_size, 8).unwrap();
    let settings = TrainConfig {
        steps: 2,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup: 1,
        batch: 1,
        accum: 1,
        seq: 8,
        clip: 1.0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        eval_every: 0,
        eval_batches: 1,
        ckpt_every: 0,
        seed: 1,
        loss_scaling: false,
    };
    let params = Params::init(&config, 1).unwrap();
    let mut trainer = Trainer::new(&device, params, settings, splits.train, splits.val).unwrap();
    let mut telemetry = train::telemetry::Telemetry::none();
    trainer.step(&mut telemetry).unwrap();
    let path = dir.join("seed.ckpt");
    trainer.save(&path).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn loaders_refuse_mutated_files_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));

    let (mil, dict) = mil_seeds();
    let dict: Vec<&str> = dict.iter().map(String::as_str).collect();

    let params = Params::init(&tiny_config(), 3).unwrap();
    let mut models = Vec::new();
    for (i, version) in [Version::V0, Version::V1].into_iter().enumerate() {
        let p = d.join(format!("seed{i}.bin"));
        write_model(&params, &p, version).unwrap();
        models.push(std::fs::read(p).unwrap());
    }

    let pieces: Vec<String> = ["<unk>", "\n<s>\n", "\n</s>\n"]
        .into_iter()
        .map(String::from)
        .chain((0..=255u8).map(|b| format!("<0x{b:02X}>")))
        .chain(["▁the", "▁a", "er", "▁once", "▁upon"].into_iter().map(String::from))
        .collect();
    let scores = (0..pieces.len()).map(|i| -(i as f32)).collect();
    let tokenizer_path = d.join("tok.bin");
    Tokenizer::new(pieces, scores).unwrap().write(&tokenizer_path).unwrap();
    let tokenizers = vec![std::fs::read(&tokenizer_path).unwrap()];

    let checkpoints = vec![checkpoint_seed(d)];

    let (model_file, ckpt_file) = (d.join("fuzz-model.bin"), d.join("fuzz.ckpt"));
    let runs: Vec<(&str, u64)> = std::thread::scope(|s| {
        let mil = s.spawn(|| {
            let n = fuzz("mil", &mil, &dict, &out, |bytes| {
                let text = String::from_utf8_lossy(bytes);
                if let Ok(program) = mil::text::parse(&text) {
                    if mil::validate(&program).is_ok() {
                        let printed = mil::text::print(&program);
                        mil::text::parse(&printed).expect("a valid program prints to text that parses");
                    }
                }
            });
            ("MIL parser", n)
        });
        let model = s.spawn(|| {
            let n = fuzz("model", &models, &[], &out, |bytes| {
                std::fs::write(&model_file, bytes).unwrap();
                let _ = read_model(&model_file);
            });
            ("model reader", n)
        });
        let tokenizer = s.spawn(|| {
            let n = fuzz("tokenizer", &tokenizers, &[], &out, |bytes| {
                if let Ok(t) = Tokenizer::parse(bytes) {
                    let ids = t.encode("once upon a time", true, false);
                    let _ = ids.windows(2).map(|w| t.decode(w[0], w[1]).len()).sum::<usize>();
                }
            });
            ("tokenizer reader", n)
        });
        let checkpoint = s.spawn(|| {
            let n = fuzz("checkpoint", &checkpoints, &[], &out, |bytes| {
                // Keep the checksum right half of the time: the structure behind it is
                // what needs the mutations.
                let mut data = bytes.to_vec();
                if data.len() > 44 && data[data.len() - 1] % 2 == 0 {
                    let body = data.len() - 32;
                    let digest = Sha256::digest(&data[..body]);
                    data[body..].copy_from_slice(&digest);
                }
                std::fs::write(&ckpt_file, &data).unwrap();
                let _ = Checkpoint::read(&ckpt_file);
                let _ = checkpoint_summary(&ckpt_file);
                let _ = load_params(&ckpt_file);
            });
            ("checkpoint reader", n)
        });
        [mil, model, tokenizer, checkpoint].into_iter().map(|h| h.join().expect("a fuzz target")).collect()
    });
    for (name, n) in runs {
        eprintln!("{name}: {n} inputs");
        assert!(n > 0, "{name}: no input ran");
    }
}
