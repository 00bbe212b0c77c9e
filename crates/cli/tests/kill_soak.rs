//! `kill -9` while a checkpoint is being written, again and again, then resume: the run
//! ends with exactly the parameters of a run never interrupted, and the half-written
//! temporary files the kills left are gone (issue 19, item 4).
//!
//! `ANETRAIN_SOAK_KILLS` sets how many kills must land in the middle of a write (CI: 3).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use train::checkpoint::Checkpoint;

const ARGS: &[&str] = &[
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
    "--eval-every",
    "0",
    "--steps",
    "40",
    "--ckpt-every",
    "1",
    "--seed",
    "7",
    "--data",
    "shards/stories.bin",
    "--tokenizer",
    "tok.bin",
];

fn command(dir: &Path, ckpt: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_anetrain"));
    c.args(ARGS).args(["--ckpt", ckpt, "--resume"]).current_dir(dir).env("ANETRAIN_QUIET", "1");
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// The temporary checkpoint files in `dir`.
fn temps(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains(".ckpt.bin.tmp-")).collect()
        })
        .unwrap_or_default()
}

fn params(path: &Path) -> Vec<u32> {
    Checkpoint::read(path).unwrap().array("params").unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn kills_during_checkpoint_writes_lose_nothing() {
    let wanted: usize = std::env::var("ANETRAIN_SOAK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A small pretokenized corpus: processes start in a fraction of a second.
    std::fs::write(d.join("stories.txt"), train::corpus::generate(300, 7).join("\n\n")).unwrap();
    for args in [
        &["tokenizer", "train", "--vocab", "300", "--in", "stories.txt", "--out", "tok.bin"][..],
        &["data", "pretokenize", "--quiet", "--tokenizer", "tok.bin", "--in", "stories.txt", "--out", "shards"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).current_dir(d).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = command(d, "a/ckpt.bin").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let run_dir = d.join("b");
    let (mut partial_kills, mut attempts) = (0, 0);
    while partial_kills < wanted {
        attempts += 1;
        assert!(attempts <= 20 * wanted, "only {partial_kills} of {attempts} kills caught a checkpoint mid-write");
        let left_before = temps(&run_dir);
        let mut child = command(d, "b/ckpt.bin").spawn().unwrap();
        // Let a random number of checkpoint writes through, then kill -9 during the next.
        let skip = rng.gen_range(0..3);
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            let own = format!(".ckpt.bin.tmp-{}", child.id());
            if temps(&run_dir).iter().any(|p| p.to_string_lossy().ends_with(&own)) {
                seen += 1;
                if seen > skip {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    break None;
                }
                // Wait for this write to finish before counting the next.
                while temps(&run_dir).iter().any(|p| p.to_string_lossy().ends_with(&own)) {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            assert!(Instant::now() < deadline, "the run neither wrote a checkpoint nor ended");
            std::thread::sleep(Duration::from_micros(100));
        };
        // Whatever the previous kill left was removed when this process started.
        for stale in &left_before {
            assert!(!stale.exists(), "{} outlived the next start", stale.display());
        }
        match finished {
            Some(status) => {
                panic!("the run ended ({status}) before {wanted} kills caught a write; {partial_kills} did")
            }
            None if !temps(&run_dir).is_empty() => partial_kills += 1,
            None => {}
        }
    }
    // The rest of the run, uninterrupted.
    let out = command(d, "b/ckpt.bin").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(temps(&run_dir).is_empty(), "stale files remain: {:?}", temps(&run_dir));
    assert!(params(&d.join("a/ckpt.bin")) == params(&run_dir.join("ckpt.bin")), "the resumed run's parameters differ");
}
