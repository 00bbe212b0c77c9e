//! Parity with llama2.c on files made by it (../shared/fixtures). This target fails with
//! a clear message when the fixtures folder is missing: it never passes silently.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    assert!(
        dir.join("stories260K.bin").exists(),
        "the fixtures folder {} is missing: these tests compare against files made by llama2.c \
         and need it (see shared/fixtures/README.md)",
        dir.display()
    );
    dir
}

#[test]
fn greedy_sampling_matches_llama2c_byte_for_byte() {
    let f = fixtures();
    {
        let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
            .args(["sample", "--model"])
            .arg(f.join("stories260K.bin"))
            .arg("--tokenizer")
            .arg(f.join("tok512.bin"))
            .args(["--temperature", "0", "--steps", "256", "--device", "cpu", "--precision", "fp32"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want = std::fs::read(f.join("stories260K.greedy-256.txt")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&want),
            "anetrain sample differs from llama2.c's reference output"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("tokens/s"), "tokens/s goes to stderr: {stderr}");
    }
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let f = fixtures();
    let prompt = "Once upon a time ".repeat(200);
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["sample", "--model"])
        .arg(f.join("stories260K.bin"))
        .arg("--tokenizer")
        .arg(f.join("tok512.bin"))
        .args(["--prompt", &prompt, "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("longer than the model's context of 512"), "{stderr}");
}

#[test]
fn a_truncated_model_is_refused() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(f.join("stories260K.bin")).unwrap();
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["sample", "--model"])
        .arg(&cut)
        .arg("--tokenizer")
        .arg(f.join("tok512.bin"))
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cut.bin"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
