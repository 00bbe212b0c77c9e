//! The training loop: batches from the data, a pipeline's loss and gradients, the
//! optimizer, evaluation, checkpoints that resume bit-identically, and telemetry.
//!
//! Any of the three pipelines ([`crate::pipelines`]) trains; the trainer also knows how
//! many compiles its next step needs, so the caller can checkpoint and restart the
//! process before the device's compile budget runs out ([`Trainer::needs_restart`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use device::Device;
use llama::{Config, Params};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::data::{self, Dataset, SamplerState};
use crate::distributed::Distributed;
use crate::optim::{AdamW, AdamWConfig, LossScaler, LrSchedule};
use crate::pipelines::{CompileCost, Pipeline, PipelineConfig};
use crate::telemetry::{Cumulative, Event, PhasesMs, Report, StepFlops, Telemetry};

/// Everything that shapes a run, saved in checkpoints so a resume continues the same
/// schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub batch: usize,
    pub accum: usize,
    pub seq: usize,
    /// Global-norm clipping threshold; 0 disables.
    pub clip: f32,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Evaluate the validation loss every this many steps (0: never).
    pub eval_every: u64,
    /// Batches averaged per evaluation.
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub ckpt_every: u64,
    pub seed: u64,
    /// Dynamic loss scaling (for fp16 precision).
    pub loss_scaling: bool,
}

impl TrainConfig {
    /// Checks the settings; errors name the flag.
    pub fn validate(&self, model: &Config) -> Result<(), TrainError> {
        let bad = |flag: &str, why: String| Err(TrainError::Config(format!("--{flag}: {why}")));
        if self.batch == 0 {
            return bad("batch", "must be at least 1".into());
        }
        if self.accum == 0 {
            return bad("accum", "must be at least 1".into());
        }
        if self.seq == 0 || self.seq > model.seq_len {
            return bad("seq", format!("{} must be between 1 and the model's context of {}", self.seq, model.seq_len));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be positive", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("min-lr", format!("{} must be between 0 and --lr {}", self.min_lr, self.lr));
        }
        if self.clip.is_nan() || self.clip < 0.0 {
            return bad("clip", format!("{} must be 0 (off) or positive", self.clip));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", format!("{} must be in [0, 1)", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", format!("{} must be in [0, 1)", self.beta2));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", format!("{} must be positive", self.eps));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight-decay", format!("{} must be 0 or positive", self.weight_decay));
        }
        let needed = self.memory_lower_bound(model)?;
        device::memory::check(&format!("--batch {} × --seq {}", self.batch, self.seq), needed)
            .map_err(|e| TrainError::Config(format!("{e} (a lower bound for this model and batch)")))?;
        Ok(())
    }

    /// Bytes a run needs at the least: parameters, gradients and the two AdamW moments
    /// (4 × 4 bytes a parameter), and per token of a micro-batch the activations kept for
    /// the backward pass (8·dim + 3·hidden per layer) and the logits and their gradient
    /// (2·vocab), all f32. Computed with overflow checks: the sizes come from flags.
    pub fn memory_lower_bound(&self, model: &Config) -> Result<usize, TrainError> {
        let overflow = |e: device::memory::AllocError| TrainError::Config(format!("--batch {}: {e}", self.batch));
        let tokens = device::memory::bytes_of("--batch × --seq", &[self.batch, self.seq]).map_err(overflow)?;
        let per_layer = 8 * model.dim + 3 * model.hidden_dim;
        let per_token = model.n_layers.saturating_mul(per_layer).saturating_add(2 * model.vocab_size);
        let activations = device::memory::bytes_of("activations", &[tokens, per_token, 4]).map_err(overflow)?;
        let state = device::memory::bytes_of("parameters", &[model.n_params(), 16]).map_err(overflow)?;
        activations.checked_add(state).ok_or_else(|| {
            overflow(device::memory::AllocError { what: "--batch".into(), needed: None, available: None })
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Device(#[from] device::Error),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] llama::Error),
    #[error("{path}: {message}")]
    Resume { path: PathBuf, message: String },
    #[error("the {what} became {value} at step {step}: training stopped (the last good checkpoint is kept)")]
    NonFinite { step: u64, what: &'static str, value: f32 },
    #[error("telemetry: {0}")]
    Telemetry(std::io::Error),
}

/// What one step did, for progress displays.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub ms: f64,
    pub tokens_per_s: f64,
    pub val_loss: Option<f32>,
    /// Time the step waited for a background compile (double-buffered pipeline).
    pub compile_stall_ms: Option<f64>,
}

/// Metadata stored in a training checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    kind: String,
    config: Config,
    train: TrainConfig,
    /// Steps completed.
    step: u64,
    adam_step: u64,
    adam: AdamWConfig,
    scaler: LossScaler,
    sampler: SamplerState,
    cumulative: Cumulative,
    /// The pipeline of the run (absent in checkpoints older than the static pipeline:
    /// those were dynamic).
    #[serde(default)]
    pipeline: PipelineConfig,
    /// The evaluation due after `step` has not run yet: a tight compile budget made the
    /// process restart between the step and its evaluation.
    #[serde(default)]
    eval_pending: bool,
}

/// What a training checkpoint holds about its run, without its arrays' meaning.
#[derive(Clone, Debug)]
pub struct CheckpointSummary {
    pub config: Config,
    pub train: TrainConfig,
    /// Steps completed.
    pub step: u64,
    /// The evaluation due after `step` has not run yet.
    pub eval_pending: bool,
}

/// Reads the run settings of a training checkpoint (to compare them with flags).
pub fn checkpoint_summary(path: &Path) -> Result<CheckpointSummary, TrainError> {
    // The metadata alone is enough; a file whose metadata does not read is read whole,
    // so that the error is the verified reader's (checksum, truncation).
    let value = match Checkpoint::read_meta(path) {
        Ok(v) => v,
        Err(_) => Checkpoint::read(path)?.meta,
    };
    let meta: Meta = serde_json::from_value(value)
        .map_err(|e| TrainError::Resume { path: path.into(), message: format!("not a training checkpoint: {e}") })?;
    Ok(CheckpointSummary { config: meta.config, train: meta.train, step: meta.step, eval_pending: meta.eval_pending })
}

const CHECKPOINT_KIND: &str = "anetrain-train";
/// The checkpoint array holding the double-buffered pipeline's one-step-old weights.
const STALE_PARAMS: &str = "pipeline.stale_params";

/// Reads the parameters (and config) of a training checkpoint, for sampling or export.
pub fn load_params(path: &Path) -> Result<Params, TrainError> {
    let mut ckpt = Checkpoint::read(path)?;
    let meta: Meta = serde_json::from_value(ckpt.meta.clone())
        .map_err(|e| TrainError::Resume { path: path.into(), message: format!("not a training checkpoint: {e}") })?;
    let data = ckpt
        .take_array("params")
        .ok_or_else(|| TrainError::Resume { path: path.into(), message: "has no `params` array".into() })?;
    Params::from_vec(&meta.config, data).map_err(|e| TrainError::Resume {
        path: path.into(),
        message: format!("parameters do not fit its config: {e}"),
    })
}

/// True when the file starts like an anetrain checkpoint.
pub fn is_checkpoint(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == crate::checkpoint::MAGIC
}

/// A training run in progress.
pub struct Trainer<'d> {
    pub config: Config,
    pub train: TrainConfig,
    pub params: Params,
    grads: Params,
    adam: AdamW,
    scaler: LossScaler,
    schedule: LrSchedule,
    pipeline: Pipeline,
    pipeline_config: PipelineConfig,
    sampler: data::Sampler,
    train_data: Dataset,
    val_data: Option<Dataset>,
    /// Steps completed.
    pub step: u64,
    /// The evaluation due after `step` is still to run (see [`Trainer::eval_fits`]).
    pub eval_pending: bool,
    pub cumulative: Cumulative,
    /// Where the last step's time went, phase by phase (also in its telemetry line).
    pub last_phases: PhasesMs,
    flops: StepFlops,
    device: &'d dyn Device,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The ranks of a data-parallel run (one process unless [`Trainer::distribute`]d).
    /// `train.accum` counts the micro-batches of a step over all ranks.
    dist: Distributed,
}

impl<'d> Trainer<'d> {
    /// A fresh run from `params` (random or loaded from a llama2.c model), with the
    /// dynamic pipeline.
    pub fn new(
        device: &'d dyn Device,
        params: Params,
        train: TrainConfig,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<Trainer<'d>, TrainError> {
        Trainer::with_pipeline(device, params, train, PipelineConfig::default(), train_data, val_data)
    }

    /// A fresh run from `params` with the pipeline `pipeline`.
    pub fn with_pipeline(
        device: &'d dyn Device,
        params: Params,
        train: TrainConfig,
        pipeline: PipelineConfig,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<Trainer<'d>, TrainError> {
        let config = params.config().clone();
        train.validate(&config)?;
        let adam_config =
            AdamWConfig { beta1: train.beta1, beta2: train.beta2, eps: train.eps, weight_decay: train.weight_decay };
        let decayed = decayed_ranges(&params);
        let adam = AdamW::new(adam_config, params.len(), decayed).map_err(|e| TrainError::Config(e.to_string()))?;
        let scaler = if train.loss_scaling { LossScaler::fp16() } else { LossScaler::disabled() };
        let sampler = data::Sampler::new(train.seed);
        let state = RunState {
            adam,
            scaler,
            sampler,
            step: 0,
            cumulative: Cumulative::default(),
            stale: None,
            eval_pending: false,
        };
        Trainer::assemble(device, params, train, pipeline, state, train_data, val_data)
    }

    fn assemble(
        device: &'d dyn Device,
        params: Params,
        train: TrainConfig,
        pipeline_config: PipelineConfig,
        state: RunState,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<Trainer<'d>, TrainError> {
        let RunState { adam, scaler, sampler, step, mut cumulative, stale, eval_pending } = state;
        pipeline_config.validate().map_err(TrainError::Config)?;
        let config = params.config().clone();
        let (pipeline, cost) = Pipeline::new(device, pipeline_config, &params, step, stale, train.batch, train.seq)?;
        cumulative.compile_seconds += cost.foreground_seconds;
        cumulative.compiles += cost.kernels as u64;
        let grads = Params::zeros(&config)?;
        let schedule =
            LrSchedule { max_lr: train.lr, min_lr: train.min_lr, warmup_steps: train.warmup, total_steps: train.steps };
        let n = train.batch * train.seq;
        Ok(Trainer {
            flops: step_flops(&config, &train, pipeline_config),
            config,
            params,
            grads,
            adam,
            scaler,
            schedule,
            pipeline,
            pipeline_config,
            sampler,
            train_data,
            val_data,
            step,
            eval_pending,
            cumulative,
            last_phases: PhasesMs::default(),
            device,
            train,
            inputs: vec![0; n],
            targets: vec![0; n],
            dist: Distributed::default(),
        })
    }

    /// Continues a run from its checkpoint, with the checkpoint's pipeline. The
    /// schedule and batch shape are taken from the checkpoint; `steps` may grow.
    pub fn resume(
        device: &'d dyn Device,
        path: &Path,
        steps: Option<u64>,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<Trainer<'d>, TrainError> {
        Trainer::resume_with(device, path, steps, None, train_data, val_data)
    }

    /// [`Trainer::resume`], optionally switching to another pipeline. Resuming the
    /// double-buffered pipeline from its own checkpoint restores its one-step-old
    /// weights, so the run continues exactly as if it had not stopped; from another
    /// pipeline's checkpoint its first step is not stale.
    pub fn resume_with(
        device: &'d dyn Device,
        path: &Path,
        steps: Option<u64>,
        pipeline: Option<PipelineConfig>,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<Trainer<'d>, TrainError> {
        let mut ckpt = Checkpoint::read(path)?;
        let resume_err = |message: String| TrainError::Resume { path: path.into(), message };
        let meta: Meta = serde_json::from_value(ckpt.meta.clone())
            .map_err(|e| resume_err(format!("not a training checkpoint: {e}")))?;
        if meta.kind != CHECKPOINT_KIND {
            return Err(resume_err(format!("is a `{}` checkpoint, not a training one", meta.kind)));
        }
        let mut array = |name: &str| ckpt.take_array(name).ok_or_else(|| resume_err(format!("has no `{name}` array")));
        let params = Params::from_vec(&meta.config, array("params")?)
            .map_err(|e| resume_err(format!("parameters do not fit its config: {e}")))?;
        let (m, v) = (array("adam.m")?, array("adam.v")?);
        if m.len() != params.len() || v.len() != params.len() {
            return Err(resume_err("optimizer state does not match the parameters".into()));
        }
        let mut adam =
            AdamW::new(meta.adam, params.len(), decayed_ranges(&params)).map_err(|e| resume_err(e.to_string()))?;
        adam.m = m;
        adam.v = v;
        adam.step = meta.adam_step;
        let mut train = meta.train;
        if let Some(s) = steps {
            train.steps = s;
        }
        let sampler = data::Sampler::restore(meta.sampler);
        let stale = match ckpt.take_array(STALE_PARAMS) {
            Some(v) => Some(
                Params::from_vec(&meta.config, v)
                    .map_err(|e| resume_err(format!("`{STALE_PARAMS}` does not fit its config: {e}")))?,
            ),
            None => None,
        };
        let pipeline = pipeline.unwrap_or(meta.pipeline);
        let state = RunState {
            adam,
            scaler: meta.scaler,
            sampler,
            step: meta.step,
            cumulative: meta.cumulative,
            stale,
            eval_pending: meta.eval_pending,
        };
        Trainer::assemble(device, params, train, pipeline, state, train_data, val_data)
    }

    /// Writes a checkpoint of the whole state (atomically).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let meta = Meta {
            kind: CHECKPOINT_KIND.into(),
            config: self.config.clone(),
            train: self.train.clone(),
            step: self.step,
            adam_step: self.adam.step,
            adam: self.adam.config,
            scaler: self.scaler.clone(),
            sampler: self.sampler.state(),
            cumulative: self.cumulative,
            pipeline: self.pipeline_config,
            eval_pending: self.eval_pending,
        };
        // Data parallel: every rank calls this (ZeRO-1 gathers the moments); rank 0 writes.
        let (m, v) = self.dist.full_moments(&self.adam, self.params.len());
        if !self.dist.is_root() {
            return Ok(());
        }
        let mut arrays =
            vec![("params".into(), self.params.as_slice().to_vec()), ("adam.m".into(), m), ("adam.v".into(), v)];
        if let Some(stale) = self.pipeline.stale_params() {
            arrays.push((STALE_PARAMS.into(), stale.as_slice().to_vec()));
        }
        let ckpt = Checkpoint { meta: serde_json::to_value(&meta).expect("checkpoint metadata serialises"), arrays };
        Ok(ckpt.write_atomic(path)?)
    }

    /// The start-of-run telemetry event.
    pub fn start_event(&self, precision: &str, resumed: bool) -> Event {
        Event::Start {
            config: self.config.clone(),
            n_params: self.params.len(),
            tokens_per_step: self.train.batch * self.train.seq * self.train.accum,
            flops_per_step: self.flops.total() * self.train.accum as f64,
            device: self.device.name().to_string(),
            precision: precision.to_string(),
            pipeline: self.pipeline_config.kind.name().into(),
            settings: self.settings_json(),
            resumed_from_step: resumed.then_some(self.step),
        }
    }

    /// Runs one optimizer step (with `accum` micro-batches) and returns what it did.
    pub fn step(&mut self, telemetry: &mut Telemetry) -> Result<StepInfo, TrainError> {
        let start = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr(step);
        self.grads.as_mut_slice().fill(0.0);
        let accum = self.train.accum;
        // Every rank counts the loss tokens of all the step's micro-batches, so all ranks
        // weigh theirs by the same total.
        let shares = LossShares::count(&self.train_data, &self.sampler, accum, &mut self.inputs, &mut self.targets);
        let loss_scale = self.scaler.scale;
        // The `accum` micro-batches share one version of the kernels: one compile.
        let batch = self.train.batch;
        let Trainer { pipeline, params, grads, train_data, sampler, inputs, targets, device, dist, .. } = self;
        let (passes, cost) = pipeline.step(*device, params, step, |passes, weights| {
            let mut loss_sum = 0.0f64;
            for micro in 0..accum {
                // Data parallel: this rank's micro-batches only; all ranks walk the stream.
                if !dist.owns(micro) {
                    train_data.skip_batch(sampler, batch);
                    continue;
                }
                train_data.sample_batch(sampler, inputs, targets);
                let n_micro = data::loss_tokens(targets);
                let grad_scale = shares.grad_scale(loss_scale, n_micro);
                let loss = passes.forward_backward(weights, grads, inputs, targets, grad_scale)?;
                if !loss.is_finite() {
                    return Err(TrainError::NonFinite { step: step + 1, what: "loss", value: loss });
                }
                loss_sum += loss as f64 * shares.loss_weight(n_micro);
            }
            Ok(loss_sum)
        })?;
        let loss = (self.dist.sum_loss(passes?) / accum as f64) as f32;
        let opt_start = Instant::now();
        let outcome = self.dist.optimizer_step(
            &mut self.adam,
            &mut self.scaler,
            self.params.as_mut_slice(),
            self.grads.as_mut_slice(),
            lr,
            self.train.clip,
        );
        let optimizer_ms = opt_start.elapsed().as_secs_f64() * 1e3;
        // In fp32 there is no loss scale to back off: a non-finite gradient means the
        // run diverged, and skipping steps forever would hide it.
        if !outcome.applied && !self.train.loss_scaling {
            return Err(TrainError::NonFinite { step: step + 1, what: "gradient norm", value: outcome.grad_norm });
        }
        let phases = self.pipeline.take_times();
        self.last_phases = PhasesMs::from_times(&phases, optimizer_ms);
        let secs = start.elapsed().as_secs_f64();
        self.step += 1;

        let tokens = (self.train.batch * self.train.seq * accum) as u64;
        self.count_compile(&cost);
        let c = &mut self.cumulative;
        c.steps += 1;
        c.tokens += tokens;
        // Train time excludes the compiles the step waited for (they are compile time).
        c.train_seconds += secs - cost.foreground_seconds - cost.stall_seconds;
        c.device_seconds += (phases.device_forward + phases.device_backward) / 1e3;
        c.device_flops += self.flops.device * accum as f64;
        c.total_flops += self.flops.total() * accum as f64;

        let stall_ms =
            (self.pipeline.kind() == crate::pipelines::PipelineKind::DoubleBuffer).then_some(cost.stall_seconds * 1e3);
        let info = StepInfo {
            step: self.step,
            loss,
            lr,
            grad_norm: outcome.grad_norm,
            ms: secs * 1e3,
            tokens_per_s: tokens as f64 / secs,
            val_loss: None,
            compile_stall_ms: stall_ms,
        };
        telemetry
            .emit(&Event::Step {
                step: self.step,
                loss,
                lr,
                grad_norm: outcome.grad_norm,
                tokens_per_s: info.tokens_per_s,
                gflops: self.flops.total() * accum as f64 / secs / 1e9,
                ms: info.ms,
                phases_ms: self.last_phases,
                loss_scale: self.train.loss_scaling.then_some(self.scaler.scale),
                compile_stall_ms: stall_ms,
                loss_tokens: Some(shares.total as u64),
            })
            .map_err(TrainError::Telemetry)?;
        Ok(info)
    }

    /// Mean validation loss over `eval_batches` batches drawn with a fixed seed (the
    /// same batches at every evaluation), or `None` without a validation split.
    pub fn evaluate(&mut self) -> Result<Option<f32>, TrainError> {
        let Some(val) = self.val_data.as_ref().filter(|_| self.train.eval_batches > 0) else { return Ok(None) };
        let mut sampler = data::Sampler::new(self.train.seed ^ 0x5EED_0F5A_11E5);
        let mut sum = 0.0f64;
        let n = self.train.eval_batches;
        // The evaluation batches weighed as one step's micro-batches: the mean over all
        // their loss tokens.
        let shares = LossShares::count(val, &sampler, n, &mut self.inputs, &mut self.targets);
        let mut cost = CompileCost::default();
        for _ in 0..n {
            val.sample_batch(&mut sampler, &mut self.inputs, &mut self.targets);
            let (loss, c) = self.pipeline.loss(self.device, &self.params, self.step, &self.inputs, &self.targets)?;
            cost += c;
            sum += loss as f64 * shares.loss_weight(data::loss_tokens(&self.targets));
        }
        self.count_compile(&cost);
        self.pipeline.take_times();
        Ok(Some((sum / n as f64) as f32))
    }

    /// Adds a compile's cost to the cumulative statistics. Compile time is the time the
    /// training thread spent compiling or waiting for a compile (so compile and train
    /// time do not overlap); the double-buffered pipeline's background compiles overlap
    /// training and count only where they made it wait (the stall).
    fn count_compile(&mut self, cost: &CompileCost) {
        let c = &mut self.cumulative;
        c.compile_seconds += cost.foreground_seconds + cost.stall_seconds;
        c.compile_stall_seconds += cost.stall_seconds;
        c.compiles += cost.kernels as u64;
    }

    /// The pipeline this run trains with.
    pub fn pipeline_config(&self) -> PipelineConfig {
        self.pipeline_config
    }

    /// Kernels one recompile compiles (0 for the dynamic pipeline).
    pub fn kernels_per_compile(&self) -> usize {
        self.pipeline.kernels_per_compile()
    }

    /// True when the validation loss is due after completing step `step` (1-based).
    pub fn eval_due(&self, step: u64) -> bool {
        self.val_data.is_some()
            && self.train.eval_every > 0
            && self.train.eval_batches > 0
            && (step.is_multiple_of(self.train.eval_every) || step == self.train.steps)
    }

    /// Compiles the next step (and the evaluation after it, if due) will do.
    pub fn compiles_ahead(&self) -> usize {
        self.pipeline.compiles_ahead(self.step, self.eval_due(self.step + 1))
    }

    /// True when the next step would exceed the device's compile budget: the caller
    /// should checkpoint and restart the process (`exec()` itself with `--resume`).
    pub fn needs_restart(&self) -> bool {
        self.device.compiles_left().is_some_and(|left| left < self.compiles_ahead())
    }

    /// Compiles the next step alone will do (without the evaluation after it).
    pub fn step_compiles_ahead(&self) -> usize {
        self.pipeline.compiles_ahead(self.step, false)
    }

    /// True when the next step alone fits the device's compile budget.
    pub fn step_fits(&self) -> bool {
        fits(self.device.compiles_left(), self.step_compiles_ahead())
    }

    /// True when an evaluation of the current parameters fits the compile budget now.
    /// (The static pipeline evaluates with kernels baking the current parameters: none
    /// to compile right after a restart, one set right after a step.)
    pub fn eval_fits(&self) -> bool {
        fits(self.device.compiles_left(), self.eval_compiles_ahead())
    }

    /// Compiles an evaluation of the current parameters will do.
    pub fn eval_compiles_ahead(&self) -> usize {
        self.pipeline.eval_compiles(self.step)
    }

    /// Sets a new learning-rate schedule (a resumed run given other --lr, --min-lr or
    /// --warmup): the steps still to come follow it.
    pub fn set_schedule(&mut self, lr: f32, min_lr: f32, warmup: u64) -> Result<(), TrainError> {
        let mut train = self.train.clone();
        (train.lr, train.min_lr, train.warmup) = (lr, min_lr, warmup);
        train.validate(&self.config)?;
        self.train = train;
        self.schedule = LrSchedule { max_lr: lr, min_lr, warmup_steps: warmup, total_steps: self.train.steps };
        Ok(())
    }

    /// The settings for the start event: the training config, plus the pipeline.
    fn settings_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.train).expect("settings serialise");
        if let Some(map) = v.as_object_mut() {
            map.insert("pipeline".into(), self.pipeline_config.kind.name().into());
            map.insert("ane_extras".into(), self.pipeline_config.ane_extras.into());
        }
        v
    }

    /// Makes this a data-parallel run over `dist`'s ranks (all of which must call it,
    /// with the same run): `train.accum` (the micro-batches of a step over all ranks) is
    /// shared out, and with `--shard-optimizer` the AdamW state is sharded (ZeRO-1).
    pub fn distribute(&mut self, mut dist: Distributed) -> Result<(), TrainError> {
        dist.check_accum(self.train.accum).map_err(TrainError::Config)?;
        dist.adopt(&mut self.adam).map_err(TrainError::Config)?;
        self.dist = dist;
        Ok(())
    }

    /// The AdamW state (without its moments under ZeRO-1: [`Distributed`] holds the shard).
    pub fn optimizer(&self) -> &AdamW {
        &self.adam
    }

    /// The ranks of this run (see [`Trainer::distribute`]).
    pub fn distributed(&self) -> &Distributed {
        &self.dist
    }

    pub fn report(&self) -> Report {
        Report::from_cumulative(&self.cumulative)
    }
}

/// How the `accum` micro-batches of one optimizer step share its loss, so that the step's
/// loss is the mean over all its loss tokens (targets that are not
/// [`data::IGNORE_TARGET`]) and its gradient that mean's.
///
/// Without a loss mask every micro-batch has `batch × seq` loss tokens, and this is the
/// plain average: gradient scale `scale / accum`, loss weight 1, bit for bit what the
/// trainer did before masks existed. With a mask, micro-batch `m` with `n_m` of the
/// step's `N` loss tokens takes gradient scale `scale · n_m / N` (its pipeline divides
/// by `n_m`) and loss weight `accum · n_m / N` (the trainer divides the weighted sum by
/// `accum`). A step without any loss token has zero weights: its gradient is zero.
#[derive(Clone, Copy, Debug)]
pub struct LossShares {
    masked: bool,
    accum: usize,
    /// `N`: loss tokens of the whole step (over all data-parallel ranks).
    pub total: usize,
}

impl LossShares {
    /// Counts the loss tokens of the step's next `accum` batches, drawn from a copy of
    /// `sampler` (so the caller draws the same batches afterwards). `inputs` and
    /// `targets` are scratch space of one batch.
    pub fn count(
        data: &Dataset,
        sampler: &data::Sampler,
        accum: usize,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) -> LossShares {
        if !data.is_masked() {
            return LossShares { masked: false, accum, total: accum * targets.len() };
        }
        let mut ahead = sampler.clone();
        let total = (0..accum)
            .map(|_| {
                data.sample_batch(&mut ahead, inputs, targets);
                data::loss_tokens(targets)
            })
            .sum();
        LossShares { masked: true, accum, total }
    }

    /// The gradient scale of a micro-batch with `n_micro` loss tokens, for a loss scale
    /// of `scale`.
    pub fn grad_scale(&self, scale: f32, n_micro: usize) -> f32 {
        match (self.masked, self.total) {
            (false, _) => scale / self.accum as f32,
            (true, 0) => 0.0,
            (true, total) => scale * (n_micro as f64 / total as f64) as f32,
        }
    }

    /// The weight of a micro-batch's mean loss in the sum the step divides by `accum`.
    pub fn loss_weight(&self, n_micro: usize) -> f64 {
        match (self.masked, self.total) {
            (false, _) => 1.0,
            (true, 0) => 0.0,
            (true, total) => (self.accum * n_micro) as f64 / total as f64,
        }
    }
}

/// True when `needed` compiles fit in what is `left` (`None`: no budget).
fn fits(left: Option<usize>, needed: usize) -> bool {
    match left {
        Some(left) => left >= needed,
        None => true,
    }
}

/// The optimizer, sampler, position and statistics of a run: what a resume restores.
struct RunState {
    adam: AdamW,
    scaler: LossScaler,
    sampler: data::Sampler,
    step: u64,
    cumulative: Cumulative,
    /// The double-buffered pipeline's one-step-old weights, when resuming one.
    stale: Option<Params>,
    eval_pending: bool,
}

/// FLOPs of one micro-batch by where they run: with the ANE extras the classifier's
/// forward (`2·V·D·T`) is a device kernel; its two backward GEMMs stay on the CPU.
fn step_flops(config: &Config, train: &TrainConfig, pipeline: PipelineConfig) -> StepFlops {
    let mut flops = StepFlops::for_step(config, train.batch, train.seq);
    if pipeline.ane_extras {
        let forward = 2.0 * (config.vocab_size * config.dim * train.batch * train.seq) as f64;
        flops.device += forward;
        flops.cpu -= forward;
    }
    flops
}

/// Index ranges of the weight-decayed tensors: the matrices (not norms or biases).
fn decayed_ranges(params: &Params) -> Vec<std::ops::Range<usize>> {
    params.layout().specs().iter().filter(|s| s.is_matrix()).map(|s| s.range()).collect()
}
