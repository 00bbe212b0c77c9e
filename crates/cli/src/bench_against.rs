//! `anetrain bench sample --against RUN`: the same model and prompt through llama2.c's
//! `run` and through anetrain's decoder, interleaved round by round, with a check that
//! the greedy texts agree.
//!
//! llama2.c is not vendored: the user builds `run` from karpathy/llama2.c with one gcc
//! line (README). The model is written in llama2.c's legacy format (the one `run`
//! reads) to a temporary directory that is removed afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use device::Precision;
use llama::tokenizer::{printable, Tokenizer};
use train::model::{generate, Decoder};

use crate::devices::{open_device, DeviceArg};

/// What the comparison needs besides the model.
pub struct Against<'a> {
    /// llama2.c's `run` binary.
    pub run: &'a Path,
    /// llama2.c tokenizer.bin, given to both sides.
    pub tokenizer: &'a Path,
    /// The prompt text.
    pub text: &'a str,
    /// Tokens to decode after the prompt.
    pub decode: usize,
    /// Rounds of each side, interleaved.
    pub rounds: usize,
}

/// One side's figures over the rounds: (lowest, highest) tokens per second.
#[derive(Default)]
struct Range(Option<(f64, f64)>);

impl Range {
    fn add(&mut self, v: f64) {
        self.0 = Some(match self.0 {
            None => (v, v),
            Some((lo, hi)) => (lo.min(v), hi.max(v)),
        });
    }
    fn show(&self) -> String {
        match self.0 {
            Some((lo, hi)) => format!("{lo:>8.1} – {hi:<8.1}"),
            None => "–".into(),
        }
    }
    fn lo(&self) -> f64 {
        self.0.map_or(0.0, |r| r.0)
    }
    fn hi(&self) -> f64 {
        self.0.map_or(0.0, |r| r.1)
    }
}

pub fn bench_against(
    params: &llama::Params,
    spec: &str,
    which: DeviceArg,
    precision: Precision,
    against: &Against,
) -> Result<()> {
    let config = params.config();
    let tokenizer =
        Tokenizer::read(against.tokenizer).with_context(|| format!("--tokenizer {}", against.tokenizer.display()))?;
    tokenizer.check_vocab(config.vocab_size).with_context(|| format!("--tokenizer for {spec}"))?;
    let prompt = tokenizer.encode(against.text, true, false);
    // Positions to run, prompt included (llama2.c's `-n`).
    let steps = prompt.len() + against.decode;
    if against.decode == 0 || steps > config.seq_len {
        bail!(
            "--prompt-text ({} tokens with BOS) plus --decode {} must fit the context of {} tokens, with at least one to decode",
            prompt.len(),
            against.decode,
            config.seq_len
        );
    }
    if !against.run.is_file() {
        bail!("--against {}: no such file (build llama2.c's run as the README says)", against.run.display());
    }
    let dir = tempfile::tempdir().context("a temporary directory for the llama2.c model")?;
    let model_path = dir.path().join("model.bin");
    llama::llama2c::write_model(params, &model_path, llama::llama2c::Version::V0)
        .with_context(|| format!("writing {}", model_path.display()))?;

    let device = open_device(which, precision)?;
    let mut decoder = Decoder::new(device.as_ref(), params)?;
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| rayon::current_num_threads().to_string());
    let (mut ours_prefill, mut ours_decode, mut theirs) = (Range::default(), Range::default(), Range::default());
    let (mut our_text, mut their_text) = (Vec::new(), Vec::new());
    for round in 0..against.rounds {
        // Ours: llama2.c's loop (`generate`), greedy.
        let mut text = Vec::new();
        let (_, stats) = generate(
            &mut decoder,
            &prompt,
            steps,
            |logits| llama::sampler::argmax(logits) as u32,
            |prev, next| text.extend_from_slice(printable(tokenizer.decode(prev, next))),
        )?;
        ours_prefill.add(stats.prefill_tokens as f64 / stats.prefill_seconds.max(1e-9));
        ours_decode.add(stats.decode_tokens as f64 / stats.decode_seconds.max(1e-9));
        // Theirs, right after: the same model, tokenizer, prompt and positions.
        let start = Instant::now();
        let out = Command::new(against.run)
            .arg(&model_path)
            .args(["-z"])
            .arg(against.tokenizer)
            .args(["-t", "0", "-n", &steps.to_string(), "-i", against.text])
            .env("OMP_NUM_THREADS", &threads)
            .output()
            .with_context(|| format!("running {}", against.run.display()))?;
        if !out.status.success() {
            bail!("{} failed ({}): {}", against.run.display(), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let rate = parse_rate(&out.stderr).or_else(|| parse_rate(&out.stdout)).with_context(|| {
            format!(
                "{} printed no `achieved tok/s` line ({:.1} s): is it llama2.c's run?",
                against.run.display(),
                start.elapsed().as_secs_f64()
            )
        })?;
        theirs.add(rate);
        if round == 0 {
            our_text = text;
            their_text = strip_rate(&out.stdout);
        }
    }
    drop(dir);

    println!(
        "bench sample --against: {spec} on {} ({}), {} rounds interleaved",
        device.name(),
        precision.name(),
        against.rounds
    );
    println!("  prompt {:?}: {} tokens with BOS; {} positions in all", against.text, prompt.len(), steps);
    println!("  llama2.c run threads (OMP_NUM_THREADS)  {threads}; anetrain threads {}", rayon::current_num_threads());
    println!("  {:<34} {:>19}", "", "tokens/s (range)");
    println!("  {:<34} {}", "anetrain prefill", ours_prefill.show());
    println!("  {:<34} {}", "anetrain decode", ours_decode.show());
    println!("  {:<34} {}", "llama2.c run (one token at a time)", theirs.show());
    println!(
        "  decode / run                       {:>8.2} – {:<8.2}× (worst pairing – best pairing)",
        ours_decode.lo() / theirs.hi().max(1e-9),
        ours_decode.hi() / theirs.lo().max(1e-9)
    );
    let bandwidth = crate::bench::read_bandwidth_gbs();
    let bytes = crate::bench::decode_bytes_per_token(config, device.dialect());
    println!(
        "  decode roofline                    {:>8.1} tokens/s ({bandwidth:.1} GB/s measured now)",
        bandwidth * 1e9 / bytes as f64
    );
    let their_text = their_text.trim_ascii_end();
    if our_text.as_slice() == their_text {
        println!("  greedy texts                       identical ({} bytes)", our_text.len());
        Ok(())
    } else {
        let at = our_text.iter().zip(their_text).take_while(|(a, b)| a == b).count();
        bail!(
            "the greedy texts differ from byte {at}: anetrain {:?}, llama2.c {:?}",
            String::from_utf8_lossy(&our_text[at..(at + 60).min(our_text.len())]),
            String::from_utf8_lossy(&their_text[at..(at + 60).min(their_text.len())])
        )
    }
}

/// The figure of run.c's last line, `achieved tok/s: X`.
fn parse_rate(out: &[u8]) -> Option<f64> {
    let s = String::from_utf8_lossy(out);
    let at = s.rfind("achieved tok/s:")?;
    s[at + "achieved tok/s:".len()..].split_whitespace().next()?.parse().ok()
}

/// run.c's stdout without its rate line (older run.c prints it to stdout).
fn strip_rate(out: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(out);
    match s.rfind("achieved tok/s:") {
        Some(at) => out[..at].to_vec(),
        None => out.to_vec(),
    }
}

/// The default prompt text of `--against` (the one llama2.c's README uses).
pub const DEFAULT_TEXT: &str = "Once upon a time";

/// Where the user keeps the tokenizer when none is given: beside `run`.
pub fn default_tokenizer(run: &Path) -> PathBuf {
    run.with_file_name("tokenizer.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_line_of_run_c_is_read_and_stripped() {
        let out = b"Once upon a time\nachieved tok/s: 812.500000\n";
        assert_eq!(parse_rate(out), Some(812.5));
        assert_eq!(strip_rate(out), b"Once upon a time\n".to_vec());
        assert_eq!(parse_rate(b"no rate here"), None);
    }
}
