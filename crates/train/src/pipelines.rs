//! The three training pipelines behind one type, so the trainer drives any of them.
//!
//! They share the model, the CPU operations, the data, checkpoints and telemetry; only
//! how the kernels get their weights differs:
//!
//! | pipeline | weights reach the kernels | compiles |
//! |---|---|---|
//! | [`PipelineKind::Dynamic`] ([`crate::pipeline`]) | in the input surfaces, every evaluation | 6, once per run |
//! | [`PipelineKind::Static`] ([`crate::static_pipeline`]) | baked as constants | `5·L` after every optimizer step, on the critical path |
//! | [`PipelineKind::DoubleBuffer`] ([`crate::double_buffer`]) | baked as constants | `5·L` per step, in a background thread; one step stale |
//!
//! [`Pipeline::step`] runs one optimizer step's passes: it brings the kernels up to the
//! parameters (a recompile for the static pipeline), hands the trainer a [`Passes`] and
//! the weights to run them with, and reports what compiling cost ([`CompileCost`]).

use device::Device;
use llama::Params;
use serde::{Deserialize, Serialize};

pub use crate::double_buffer::CompileCost;
use crate::double_buffer::DoubleBufferPipeline;
use crate::pipeline::{DynamicPipeline, PhaseTimes};
use crate::static_pipeline::{StaticOptions, StaticPipeline};

/// Which pipeline trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineKind {
    /// Weights in surfaces; compile once.
    #[default]
    Dynamic,
    /// Weights baked; recompile after every optimizer step.
    Static,
    /// Weights baked; recompile in the background, one step stale.
    DoubleBuffer,
}

impl PipelineKind {
    pub const ALL: [PipelineKind; 3] = [PipelineKind::Dynamic, PipelineKind::Static, PipelineKind::DoubleBuffer];

    /// The name used by `--pipeline` and in telemetry.
    pub fn name(self) -> &'static str {
        match self {
            PipelineKind::Dynamic => "dynamic",
            PipelineKind::Static => "static",
            PipelineKind::DoubleBuffer => "double-buffer",
        }
    }
}

impl std::fmt::Display for PipelineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A pipeline and its options; saved in checkpoints so a resume continues with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub kind: PipelineKind,
    /// Final RMSNorm, classifier + softmax and RMSNorm backward as device kernels
    /// (static and double-buffer only).
    #[serde(default)]
    pub ane_extras: bool,
    /// How kernels bind their surfaces (`--ane-io`; checkpoints from before it was
    /// recorded read as packed).
    #[serde(default)]
    pub io: crate::binding::IoConvention,
}

impl PipelineConfig {
    pub fn new(kind: PipelineKind, ane_extras: bool) -> PipelineConfig {
        PipelineConfig { kind, ane_extras, io: Default::default() }
    }

    /// Checks the combination; the error names the flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.ane_extras && self.kind == PipelineKind::Dynamic {
            return Err("--ane-extras: the extras bake the classifier and norms into kernels; they need \
                        --pipeline static or double-buffer"
                .into());
        }
        Ok(())
    }

    /// `dynamic`, `static`, `static+extras`, `double-buffer+extras`…: for reports.
    pub fn label(&self) -> String {
        if self.ane_extras {
            format!("{}+extras", self.kind.name())
        } else {
            self.kind.name().to_string()
        }
    }

    fn static_options(&self) -> StaticOptions {
        StaticOptions { ane_extras: self.ane_extras, io: self.io, ..StaticOptions::default() }
    }
}

/// One micro-batch's forward and backward passes, whatever the pipeline.
pub trait Passes {
    /// Mean cross-entropy and its gradients times `grad_scale`, accumulated into `grads`.
    fn forward_backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32>;

    /// Mean cross-entropy, without gradients.
    fn loss(&mut self, params: &Params, inputs: &[u32], targets: &[u32]) -> device::Result<f32>;
}

impl Passes for DynamicPipeline {
    fn forward_backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        DynamicPipeline::forward_backward(self, params, grads, inputs, targets, grad_scale)
    }

    fn loss(&mut self, params: &Params, inputs: &[u32], targets: &[u32]) -> device::Result<f32> {
        DynamicPipeline::loss(self, params, inputs, targets)
    }
}

impl Passes for StaticPipeline {
    fn forward_backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        StaticPipeline::forward_backward(self, params, grads, inputs, targets, grad_scale)
    }

    fn loss(&mut self, params: &Params, inputs: &[u32], targets: &[u32]) -> device::Result<f32> {
        StaticPipeline::loss(self, params, inputs, targets)
    }
}

/// A training pipeline of any kind.
// One per run, moved rarely: boxing the larger variants buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Pipeline {
    Dynamic(DynamicPipeline),
    Static(StaticPipeline),
    DoubleBuffer(DoubleBufferPipeline),
}

impl Pipeline {
    /// Compiles the pipeline for `params`, which are parameter version `version` (the
    /// trainer's step count). `stale` is the double-buffered pipeline's snapshot of the
    /// previous version when resuming (`W_{version−1}`); `None` starts it from `params`.
    /// Returns the pipeline and what its initial compile cost.
    pub fn new(
        device: &dyn Device,
        config: PipelineConfig,
        params: &Params,
        version: u64,
        stale: Option<Params>,
        batch: usize,
        seq: usize,
    ) -> device::Result<(Pipeline, CompileCost)> {
        let model = params.config();
        if config.kind != PipelineKind::Dynamic && (model.qk_norm || model.head_dim() * model.n_heads != model.dim) {
            // The static kernels normalise, rotate and attend inside one program whose
            // layout assumes heads of dim / n_heads and no per-head norm; not written yet.
            return Err(device::Error::new(
                device::ErrorKind::Program,
                format!(
                    "--pipeline {}: models with QK-norm or a head width apart from dim / n_heads (Qwen3) train with \
                     --pipeline dynamic only",
                    config.kind.name()
                ),
            ));
        }
        let start = std::time::Instant::now();
        let (pipeline, kernels) = match config.kind {
            PipelineKind::Dynamic => {
                let p = DynamicPipeline::with_io(device, params.config(), batch, seq, config.io)?;
                (Pipeline::Dynamic(p), DynamicPipeline::KERNELS)
            }
            PipelineKind::Static => {
                let p = StaticPipeline::new(device, params, version, batch, seq, config.static_options())?;
                let n = p.initial_kernels();
                (Pipeline::Static(p), n)
            }
            PipelineKind::DoubleBuffer => {
                let (snapshot, v) = match stale {
                    Some(s) if version > 0 => (s, version - 1),
                    _ => (params.clone(), version),
                };
                let p = DoubleBufferPipeline::new(device, snapshot, v, batch, seq, config.static_options())?;
                let n = p.inner().initial_kernels();
                (Pipeline::DoubleBuffer(p), n)
            }
        };
        let cost = CompileCost { foreground_seconds: start.elapsed().as_secs_f64(), kernels, ..Default::default() };
        Ok((pipeline, cost))
    }

    pub fn kind(&self) -> PipelineKind {
        match self {
            Pipeline::Dynamic(_) => PipelineKind::Dynamic,
            Pipeline::Static(_) => PipelineKind::Static,
            Pipeline::DoubleBuffer(_) => PipelineKind::DoubleBuffer,
        }
    }

    /// Kernels one recompile compiles (0: the dynamic pipeline never recompiles).
    pub fn kernels_per_compile(&self) -> usize {
        match self {
            Pipeline::Dynamic(_) => 0,
            Pipeline::Static(p) => p.kernels_per_compile(),
            Pipeline::DoubleBuffer(p) => p.inner().kernels_per_compile(),
        }
    }

    /// Compiles the step with parameter version `version` will do, plus, if
    /// `eval_follows`, the evaluation right after it (at version `version + 1`).
    pub fn compiles_ahead(&self, version: u64, eval_follows: bool) -> usize {
        match self {
            Pipeline::Dynamic(_) => 0,
            Pipeline::Static(p) => {
                let step = if p.version() == Some(version) { 0 } else { p.kernels_per_compile() };
                step + if eval_follows { p.kernels_per_compile() } else { 0 }
            }
            // Evaluation uses the kernels in service: no compile.
            Pipeline::DoubleBuffer(p) => p.compiles_for(version),
        }
    }

    /// Compiles an evaluation of the parameters of version `version` will do.
    pub fn eval_compiles(&self, version: u64) -> usize {
        match self {
            Pipeline::Static(p) if p.version() != Some(version) => p.kernels_per_compile(),
            // The dynamic pipeline compiles once; the double-buffered one evaluates with
            // the kernels in service.
            _ => 0,
        }
    }

    /// One optimizer step's passes: brings the kernels up to `params` (version
    /// `version`), then calls `train` with the passes and the weights they must be given
    /// (`params`, or for the double-buffered pipeline the one-step-old snapshot).
    pub fn step<R>(
        &mut self,
        device: &dyn Device,
        params: &Params,
        version: u64,
        train: impl FnOnce(&mut dyn Passes, &Params) -> R,
    ) -> device::Result<(R, CompileCost)> {
        match self {
            Pipeline::Dynamic(p) => Ok((train(p, params), CompileCost::default())),
            Pipeline::Static(p) => {
                let cost = ensure(p, device, params, version)?;
                Ok((train(p, params), cost))
            }
            Pipeline::DoubleBuffer(p) => p.step(device, params, version, |inner, weights| train(inner, weights)),
        }
    }

    /// The mean loss of `params` (version `version`) on one batch, for evaluation. The
    /// static pipeline compiles the kernels for `params` if it has not yet; the
    /// double-buffered one evaluates the kernels in service (one step behind).
    pub fn loss(
        &mut self,
        device: &dyn Device,
        params: &Params,
        version: u64,
        inputs: &[u32],
        targets: &[u32],
    ) -> device::Result<(f32, CompileCost)> {
        match self {
            Pipeline::Dynamic(p) => Ok((p.loss(params, inputs, targets)?, CompileCost::default())),
            Pipeline::Static(p) => {
                let cost = ensure(p, device, params, version)?;
                Ok((p.loss(params, inputs, targets)?, cost))
            }
            Pipeline::DoubleBuffer(p) => Ok((p.loss(inputs, targets)?, CompileCost::default())),
        }
    }

    /// Phase times since the last call.
    pub fn take_times(&mut self) -> PhaseTimes {
        match self {
            Pipeline::Dynamic(p) => p.times.take(),
            Pipeline::Static(p) => p.times.take(),
            Pipeline::DoubleBuffer(p) => p.inner_mut().times.take(),
        }
    }

    /// The double-buffered pipeline's snapshot (the weights its kernels bake), which a
    /// checkpoint must keep for an exact resume.
    pub fn stale_params(&self) -> Option<&Params> {
        match self {
            Pipeline::DoubleBuffer(p) => Some(p.snapshot()),
            _ => None,
        }
    }
}

/// Recompiles a static pipeline for `params` if needed, as a [`CompileCost`].
fn ensure(p: &mut StaticPipeline, device: &dyn Device, params: &Params, version: u64) -> device::Result<CompileCost> {
    let kernels = if p.version() == Some(version) { 0 } else { p.kernels_per_compile() };
    let secs = p.ensure(device, params, version)?;
    Ok(CompileCost { foreground_seconds: secs, kernels, ..Default::default() })
}
