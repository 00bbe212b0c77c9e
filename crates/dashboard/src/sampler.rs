//! Sample text from the newest checkpoint, generated on a background thread so the UI
//! never waits for it.
//!
//! The worker runs the model on the CPU device with one thread: the training beside it
//! needs the cores more than a preview does.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};

use device::cpu::CpuDevice;
use device::Precision;
use llama::{Sampler, Tokenizer};
use train::model::{generate, Decoder};

/// How a sample is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleSettings {
    /// Positions to generate (BOS included), capped at the model's context.
    pub tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SampleSettings {
    /// The values `anetrain train` uses for its closing sample.
    fn default() -> SampleSettings {
        SampleSettings { tokens: 120, temperature: 0.8, top_p: 0.9, seed: 1337 }
    }
}

/// What came back for one checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleText {
    /// The step of the checkpoint.
    pub step: u64,
    pub checkpoint: PathBuf,
    /// The text, or why there is none.
    pub text: Result<String, String>,
}

/// Generates text from an anetrain checkpoint and the `tokenizer.bin` beside it.
pub fn sample_checkpoint(checkpoint: &Path, settings: &SampleSettings) -> Result<String, String> {
    let params = train::trainer::load_params(checkpoint).map_err(|e| format!("{}: {e}", checkpoint.display()))?;
    let tokenizer_path = checkpoint.with_file_name("tokenizer.bin");
    let tokenizer = Tokenizer::read(&tokenizer_path).map_err(|e| format!("{}: {e}", tokenizer_path.display()))?;
    let device = CpuDevice::new(Precision::Fp32).with_threads(1);
    let mut decoder = Decoder::new(&device, &params).map_err(|e| e.to_string())?;
    let mut sampler = Sampler::new(settings.temperature, settings.top_p, settings.seed).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    let steps = settings.tokens.min(params.config().seq_len);
    generate(
        &mut decoder,
        &[llama::tokenizer::BOS],
        steps,
        |logits| sampler.sample(logits),
        |prev, next| text.extend_from_slice(llama::tokenizer::printable(tokenizer.decode(prev, next))),
    )
    .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&text).trim().to_string())
}

/// A background thread that samples checkpoints on request. Requests that pile up while
/// it works collapse to the newest: only the latest checkpoint is worth a preview.
pub struct SampleWorker {
    requests: Sender<(u64, PathBuf)>,
    results: Receiver<SampleText>,
    busy_with: Option<u64>,
}

impl SampleWorker {
    pub fn spawn(settings: SampleSettings) -> SampleWorker {
        let (requests, request_rx) = mpsc::channel::<(u64, PathBuf)>();
        let (result_tx, results) = mpsc::channel();
        std::thread::Builder::new()
            .name("sample".into())
            .spawn(move || {
                while let Ok(mut request) = request_rx.recv() {
                    while let Ok(newer) = request_rx.try_recv() {
                        request = newer;
                    }
                    let (step, checkpoint) = request;
                    let text = sample_checkpoint(&checkpoint, &settings);
                    if result_tx.send(SampleText { step, checkpoint, text }).is_err() {
                        return;
                    }
                }
            })
            .expect("a thread can be spawned");
        SampleWorker { requests, results, busy_with: None }
    }

    /// Asks for a sample of the checkpoint written at `step`.
    pub fn request(&mut self, step: u64, checkpoint: PathBuf) {
        // The worker lives as long as `self`; a send can only fail if it panicked, and
        // then the UI shows no sample, which is all it can do.
        if self.requests.send((step, checkpoint)).is_ok() {
            self.busy_with = Some(step);
        }
    }

    /// The step being sampled now, if any.
    pub fn busy_with(&self) -> Option<u64> {
        self.busy_with
    }

    /// The newest finished sample, without waiting.
    pub fn try_recv(&mut self) -> Option<SampleText> {
        let mut newest = None;
        while let Ok(sample) = self.results.try_recv() {
            if self.busy_with == Some(sample.step) {
                self.busy_with = None;
            }
            newest = Some(sample);
        }
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_checkpoint_says_which_file() {
        let err = sample_checkpoint(Path::new("/nonexistent/ckpt.bin"), &SampleSettings::default()).unwrap_err();
        assert!(err.starts_with("/nonexistent/ckpt.bin:"), "{err}");
    }

    #[test]
    fn the_worker_reports_back_without_blocking() {
        let mut worker = SampleWorker::spawn(SampleSettings::default());
        assert_eq!(worker.try_recv(), None);
        worker.request(5, PathBuf::from("/nonexistent/ckpt.bin"));
        assert_eq!(worker.busy_with(), Some(5));
        // Wait (bounded) for the answer; the error is the expected outcome.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let result = loop {
            if let Some(r) = worker.try_recv() {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "the worker never answered");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(result.step, 5);
        assert!(result.text.unwrap_err().contains("/nonexistent/ckpt.bin"));
        assert_eq!(worker.busy_with(), None);
    }
}
