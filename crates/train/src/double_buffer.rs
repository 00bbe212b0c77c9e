//! Double-buffered compilation: the static pipeline's kernels, with the recompile moved
//! off the critical path.
//!
//! The static pipeline stops after every optimizer step to compile `5·L` kernels with
//! the new weights. Here a background thread compiles the next [`KernelSet`] while the
//! current one keeps training, and the sets swap at the batch boundary (the ANE is
//! reported to compile and evaluate concurrently, DESIGN.md; on the CPU device
//! `--sim-compile-ms` emulates its compile latency).
//!
//! # Staleness: exactly one batch, always
//!
//! With `W_k` the parameters before optimizer step `k` (`W_0` the initial ones):
//!
//! ```text
//! step k:  background thread: compile K(W_k)          ┐ concurrently
//!          training thread:   gradient g_k at W_{k−1} ┘ (with K(W_{k−1}))
//!          wait for K(W_k)  ← the compile stall, reported per step
//!          W_{k+1} = AdamW(W_k, g_k)                    (the gradient is applied to
//!                                                        the current weights)
//! ```
//!
//! Step 0 uses `W_0` (there is nothing older). So step `k ≥ 1` computes its loss and
//! gradient at the weights of one step before — all of it, not just the kernels: the
//! CPU side (embedding, classifier, norms, dW) uses the same snapshot `W_{k−1}`, so the
//! gradient is the exact gradient of the loss at `W_{k−1}` — and the optimizer applies it
//! to `W_k`, as delayed-gradient SGD does. The delay is fixed by construction, not by
//! timing: when a compile is slower than a step, the trainer waits for it (that is the
//! stall) rather than training on older kernels, so a run is reproducible bit for bit
//! and resumes exactly (the snapshot is saved in checkpoints).
//!
//! The evaluation of the validation loss uses the kernels in service: after step `k`'s
//! update (the trainer holds `W_{k+1}`) that is `W_k`, one step behind the parameters it
//! is reported with.

use std::time::Instant;

use device::Device;
use llama::Params;

use crate::static_pipeline::{KernelSet, StaticOptions, StaticPipeline};

/// What a step's compile cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompileCost {
    /// Seconds the training thread spent compiling (static pipeline, initial sets).
    pub foreground_seconds: f64,
    /// Seconds the training thread waited for the background compile.
    pub stall_seconds: f64,
    /// Seconds the background thread spent compiling (overlapped with training).
    pub background_seconds: f64,
    /// Kernels compiled.
    pub kernels: usize,
}

impl std::ops::AddAssign for CompileCost {
    fn add_assign(&mut self, o: CompileCost) {
        self.foreground_seconds += o.foreground_seconds;
        self.stall_seconds += o.stall_seconds;
        self.background_seconds += o.background_seconds;
        self.kernels += o.kernels;
    }
}

/// The static pipeline with its recompiles in a background thread.
pub struct DoubleBufferPipeline {
    inner: StaticPipeline,
    /// The parameters the kernels in service were compiled from (`W_{k−1}` during step
    /// `k`); the CPU side of the passes uses them too.
    snapshot: Params,
}

impl DoubleBufferPipeline {
    /// A pipeline whose kernels in service bake `snapshot`, taken as parameter version
    /// `version`: for a fresh run the initial parameters and version 0; for a resumed run
    /// the snapshot saved in the checkpoint (`W_{k−1}`) and `k − 1`.
    pub fn new(
        device: &dyn Device,
        snapshot: Params,
        version: u64,
        batch: usize,
        seq: usize,
        options: StaticOptions,
    ) -> device::Result<DoubleBufferPipeline> {
        let inner = StaticPipeline::new(device, &snapshot, version, batch, seq, options)?;
        Ok(DoubleBufferPipeline { inner, snapshot })
    }

    /// The pipeline in service (its kernels and surfaces).
    pub fn inner(&self) -> &StaticPipeline {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut StaticPipeline {
        &mut self.inner
    }

    /// The parameters the kernels in service bake.
    pub fn snapshot(&self) -> &Params {
        &self.snapshot
    }

    /// The mean loss of the snapshot on one batch (evaluation uses the kernels in
    /// service, one step behind the trainer's parameters).
    pub fn loss(&mut self, inputs: &[u32], targets: &[u32]) -> device::Result<f32> {
        self.inner.loss(&self.snapshot, inputs, targets)
    }

    /// Kernels the step for `version` will compile (in the background).
    pub fn compiles_for(&self, version: u64) -> usize {
        if self.inner.version() == Some(version) {
            0
        } else {
            self.inner.kernels_per_compile()
        }
    }

    /// One optimizer step's passes: runs `train` on the kernels in service and their
    /// weights (the snapshot) while a background thread compiles the set for `params`
    /// (version `version`); then waits for it and swaps it in, with `params` as the new
    /// snapshot. Returns what `train` returned and the compile cost.
    ///
    /// A compile error is returned after `train` has finished (its result is dropped).
    pub fn step<R>(
        &mut self,
        device: &dyn Device,
        params: &Params,
        version: u64,
        train: impl FnOnce(&mut StaticPipeline, &Params) -> R,
    ) -> device::Result<(R, CompileCost)> {
        if self.inner.version() == Some(version) {
            // Step 0 (or a repeat of a version): the kernels in service are current.
            return Ok((train(&mut self.inner, &self.snapshot), CompileCost::default()));
        }
        let shape = self.inner.shape().clone();
        let inner = &mut self.inner;
        let snapshot = &self.snapshot;
        let (result, compiled, stall) = std::thread::scope(|scope| {
            let job = scope.spawn(|| KernelSet::compile(device, &shape, params));
            let result = train(inner, snapshot);
            let wait = Instant::now();
            let compiled = job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (result, compiled, wait.elapsed().as_secs_f64())
        });
        let set = compiled?;
        let cost = CompileCost {
            foreground_seconds: 0.0,
            stall_seconds: stall,
            background_seconds: set.compile_seconds,
            kernels: set.len(),
        };
        self.inner.install(set, version);
        self.snapshot.as_mut_slice().copy_from_slice(params.as_slice());
        Ok((result, cost))
    }
}
