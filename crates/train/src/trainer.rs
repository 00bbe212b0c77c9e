//! The training loop: batches from the data, a pipeline's loss and gradients, the
//! optimizer, evaluation, checkpoints that resume bit-identically, and telemetry.

use std::path::{Path, PathBuf};
use std::time::Instant;

use device::Device;
use llama::{Config, Params};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::data::{self, Dataset, SamplerState};
use crate::optim::{self, AdamW, AdamWConfig, LossScaler, LrSchedule};
use crate::pipeline::DynamicPipeline;
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
        Ok(())
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
}

const CHECKPOINT_KIND: &str = "anetrain-train";

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
    pipeline: DynamicPipeline,
    sampler: data::Sampler,
    train_data: Dataset,
    val_data: Option<Dataset>,
    /// Steps completed.
    pub step: u64,
    pub cumulative: Cumulative,
    flops: StepFlops,
    device: &'d dyn Device,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl<'d> Trainer<'d> {
    /// A fresh run from `params` (random or loaded from a llama2.c model).
    pub fn new(
        device: &'d dyn Device,
        params: Params,
        train: TrainConfig,
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
        Trainer::assemble(device, params, train, adam, scaler, sampler, train_data, val_data, 0, Cumulative::default())
    }

    #[allow(clippy::too_many_arguments)] // the whole state of a run, in one place
    fn assemble(
        device: &'d dyn Device,
        params: Params,
        train: TrainConfig,
        adam: AdamW,
        scaler: LossScaler,
        sampler: data::Sampler,
        train_data: Dataset,
        val_data: Option<Dataset>,
        step: u64,
        mut cumulative: Cumulative,
    ) -> Result<Trainer<'d>, TrainError> {
        let config = params.config().clone();
        let pipeline = DynamicPipeline::new(device, &config, train.batch, train.seq)?;
        cumulative.compile_seconds += pipeline.compile_seconds;
        cumulative.compiles += DynamicPipeline::KERNELS as u64;
        let grads = Params::zeros(&config)?;
        let schedule =
            LrSchedule { max_lr: train.lr, min_lr: train.min_lr, warmup_steps: train.warmup, total_steps: train.steps };
        let n = train.batch * train.seq;
        Ok(Trainer {
            flops: StepFlops::for_step(&config, train.batch, train.seq),
            config,
            params,
            grads,
            adam,
            scaler,
            schedule,
            pipeline,
            sampler,
            train_data,
            val_data,
            step,
            cumulative,
            device,
            train,
            inputs: vec![0; n],
            targets: vec![0; n],
        })
    }

    /// Continues a run from its checkpoint. `train` must describe the same run
    /// (the schedule and batch shape are taken from the checkpoint; `steps` may grow).
    pub fn resume(
        device: &'d dyn Device,
        path: &Path,
        steps: Option<u64>,
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
        Trainer::assemble(
            device,
            params,
            train,
            adam,
            meta.scaler,
            sampler,
            train_data,
            val_data,
            meta.step,
            meta.cumulative,
        )
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
        };
        let ckpt = Checkpoint {
            meta: serde_json::to_value(&meta).expect("checkpoint metadata serialises"),
            arrays: vec![
                ("params".into(), self.params.as_slice().to_vec()),
                ("adam.m".into(), self.adam.m.clone()),
                ("adam.v".into(), self.adam.v.clone()),
            ],
        };
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
            pipeline: "dynamic".into(),
            settings: serde_json::to_value(&self.train).expect("settings serialise"),
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
        let grad_scale = self.scaler.scale / accum as f32;
        let mut loss_sum = 0.0f64;
        for _ in 0..accum {
            self.train_data.sample_batch(&mut self.sampler, &mut self.inputs, &mut self.targets);
            let loss = self.pipeline.forward_backward(
                &self.params,
                &mut self.grads,
                &self.inputs,
                &self.targets,
                grad_scale,
            )?;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite { step: step + 1, what: "loss", value: loss });
            }
            loss_sum += loss as f64;
        }
        let loss = (loss_sum / accum as f64) as f32;
        let opt_start = Instant::now();
        let outcome = optim::step_with_scaling(
            &mut self.adam,
            &mut self.scaler,
            self.params.as_mut_slice(),
            self.grads.as_slice(),
            lr,
            self.train.clip,
        );
        let optimizer_ms = opt_start.elapsed().as_secs_f64() * 1e3;
        // In fp32 there is no loss scale to back off: a non-finite gradient means the
        // run diverged, and skipping steps forever would hide it.
        if !outcome.applied && !self.train.loss_scaling {
            return Err(TrainError::NonFinite { step: step + 1, what: "gradient norm", value: outcome.grad_norm });
        }
        let phases = self.pipeline.times.take();
        let secs = start.elapsed().as_secs_f64();
        self.step += 1;

        let tokens = (self.train.batch * self.train.seq * accum) as u64;
        let c = &mut self.cumulative;
        c.steps += 1;
        c.tokens += tokens;
        c.train_seconds += secs;
        c.device_seconds += (phases.device_forward + phases.device_backward) / 1e3;
        c.device_flops += self.flops.device * accum as f64;
        c.total_flops += self.flops.total() * accum as f64;

        let info = StepInfo {
            step: self.step,
            loss,
            lr,
            grad_norm: outcome.grad_norm,
            ms: secs * 1e3,
            tokens_per_s: tokens as f64 / secs,
            val_loss: None,
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
                phases_ms: PhasesMs::from_times(&phases, optimizer_ms),
                loss_scale: self.train.loss_scaling.then_some(self.scaler.scale),
                compile_stall_ms: None,
            })
            .map_err(TrainError::Telemetry)?;
        Ok(info)
    }

    /// Mean validation loss over `eval_batches` batches drawn with a fixed seed (the
    /// same batches at every evaluation), or `None` without a validation split.
    pub fn evaluate(&mut self) -> Result<Option<f32>, TrainError> {
        let Some(val) = &self.val_data else { return Ok(None) };
        let mut sampler = data::Sampler::new(self.train.seed ^ 0x5EED_0F5A_11E5);
        let mut sum = 0.0f64;
        let n = self.train.eval_batches.max(1);
        for _ in 0..n {
            val.sample_batch(&mut sampler, &mut self.inputs, &mut self.targets);
            sum += self.pipeline.loss(&self.params, &self.inputs, &self.targets)? as f64;
        }
        self.pipeline.times.take();
        Ok(Some((sum / n as f64) as f32))
    }

    pub fn report(&self) -> Report {
        Report::from_cumulative(&self.cumulative)
    }
}

/// Index ranges of the weight-decayed tensors: the matrices (not norms or biases).
fn decayed_ranges(params: &Params) -> Vec<std::ops::Range<usize>> {
    params.layout().specs().iter().filter(|s| s.is_matrix()).map(|s| s.range()).collect()
}
