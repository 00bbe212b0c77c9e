//! LoRA fine-tuning runs: the frozen base in a [`LoraPipeline`], AdamW over the adapters
//! only, evaluation, telemetry and checkpoints that resume bit-identically.
//!
//! Kept apart from [`crate::trainer::Trainer`] (whose state is the whole model's): here
//! the trainable vector is the adapters', and the gradient and both AdamW moments are the
//! adapters' size. It shares the trainer's settings ([`TrainConfig`]), errors, data
//! sampler, optimizer, loss scaler and telemetry events.
//!
//! A LoRA checkpoint (`kind = "anetrain-lora"`) holds the base (`base`: the fp16-rounded
//! weights the kernels bake, as f32), the adapters (`lora`), the AdamW moments and the
//! run's metadata, so a resume needs nothing else and continues exactly.

use std::path::Path;
use std::time::Instant;

use device::Device;
use llama::{Config, Params};
use serde::{Deserialize, Serialize};

use crate::binding::IoConvention;
use crate::checkpoint::Checkpoint;
use crate::data::{self, Dataset, SamplerState};
use crate::lora::{LoraConfig, LoraParams};
use crate::lora_pipeline::{dropout_seed, LoraPipeline};
use crate::optim::{self, AdamW, AdamWConfig, LossScaler, LrSchedule};
use crate::telemetry::{Cumulative, Event, PhasesMs, Report, StepFlops, Telemetry};
use crate::trainer::{LossShares, StepInfo, TrainConfig, TrainError};

/// The checkpoint kind of LoRA runs.
pub const CHECKPOINT_KIND: &str = "anetrain-lora";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    kind: String,
    config: Config,
    lora: LoraConfig,
    train: TrainConfig,
    step: u64,
    adam_step: u64,
    adam: AdamWConfig,
    scaler: LossScaler,
    sampler: SamplerState,
    cumulative: Cumulative,
    io: IoConvention,
}

/// What a LoRA checkpoint holds: the base, the adapters and the run's settings.
pub struct LoraCheckpoint {
    pub base: Params,
    pub lora: LoraParams,
    pub train: TrainConfig,
    pub step: u64,
}

/// True when `path` is a LoRA training checkpoint (by its metadata).
pub fn is_lora_checkpoint(path: &Path) -> bool {
    Checkpoint::read_meta(path).ok().and_then(|m| m.get("kind").and_then(|k| k.as_str()).map(|k| k == CHECKPOINT_KIND))
        == Some(true)
}

/// A LoRA checkpoint's settings, read from its metadata alone.
pub struct LoraSummary {
    pub config: Config,
    pub lora: LoraConfig,
    pub train: TrainConfig,
    pub step: u64,
}

/// Reads a LoRA checkpoint's settings without its arrays.
pub fn read_summary(path: &Path) -> Result<LoraSummary, TrainError> {
    let meta: Meta = serde_json::from_value(Checkpoint::read_meta(path)?)
        .map_err(|e| TrainError::Resume { path: path.into(), message: format!("not a LoRA checkpoint: {e}") })?;
    Ok(LoraSummary { config: meta.config, lora: meta.lora, train: meta.train, step: meta.step })
}

/// Reads a LoRA checkpoint's base and adapters (for export, merging and sampling).
pub fn load_lora_checkpoint(path: &Path) -> Result<LoraCheckpoint, TrainError> {
    let (meta, mut ckpt) = read(path)?;
    let err = |message: String| TrainError::Resume { path: path.into(), message };
    let base = ckpt.take_array("base").ok_or_else(|| err("has no `base` array".into()))?;
    let base = Params::from_vec(&meta.config, base).map_err(|e| err(format!("base does not fit its config: {e}")))?;
    let lora = ckpt.take_array("lora").ok_or_else(|| err("has no `lora` array".into()))?;
    let lora = LoraParams::from_vec(&meta.config, &meta.lora, lora).map_err(err)?;
    Ok(LoraCheckpoint { base, lora, train: meta.train, step: meta.step })
}

fn read(path: &Path) -> Result<(Meta, Checkpoint), TrainError> {
    let ckpt = Checkpoint::read(path)?;
    let meta: Meta = serde_json::from_value(ckpt.meta.clone())
        .map_err(|e| TrainError::Resume { path: path.into(), message: format!("not a LoRA checkpoint: {e}") })?;
    if meta.kind != CHECKPOINT_KIND {
        return Err(TrainError::Resume { path: path.into(), message: format!("is a `{}` checkpoint", meta.kind) });
    }
    Ok((meta, ckpt))
}

/// A LoRA fine-tuning run in progress.
pub struct LoraTrainer<'d> {
    pub train: TrainConfig,
    pub lora: LoraParams,
    grads: Vec<f32>,
    adam: AdamW,
    scaler: LossScaler,
    schedule: LrSchedule,
    pipeline: LoraPipeline,
    sampler: data::Sampler,
    train_data: Dataset,
    val_data: Option<Dataset>,
    io: IoConvention,
    pub step: u64,
    pub cumulative: Cumulative,
    pub last_phases: PhasesMs,
    device: &'d dyn Device,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl<'d> LoraTrainer<'d> {
    /// A fresh run: `base` frozen (its projections are baked as fp16), `lora` trained.
    pub fn new(
        device: &'d dyn Device,
        base: Params,
        lora: LoraParams,
        train: TrainConfig,
        io: IoConvention,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<LoraTrainer<'d>, TrainError> {
        train.validate(base.config())?;
        lora.config.validate(base.config()).map_err(TrainError::Config)?;
        let adam_config =
            AdamWConfig { beta1: train.beta1, beta2: train.beta2, eps: train.eps, weight_decay: train.weight_decay };
        // Every adapter value is decayed, as torch.optim.AdamW does with PEFT's
        // trainable parameters (one parameter group).
        let adam = AdamW::new(adam_config, lora.len(), std::iter::once(0..lora.len()).collect())
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let scaler = if train.loss_scaling { LossScaler::fp16() } else { LossScaler::disabled() };
        let sampler = data::Sampler::new(train.seed);
        LoraTrainer::assemble(
            device,
            base,
            lora,
            train,
            io,
            (adam, scaler, sampler, 0, Cumulative::default()),
            train_data,
            val_data,
        )
    }

    #[allow(clippy::type_complexity, clippy::too_many_arguments)] // the run's parts, resumed or fresh
    fn assemble(
        device: &'d dyn Device,
        base: Params,
        lora: LoraParams,
        train: TrainConfig,
        io: IoConvention,
        state: (AdamW, LossScaler, data::Sampler, u64, Cumulative),
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<LoraTrainer<'d>, TrainError> {
        let (adam, scaler, sampler, step, mut cumulative) = state;
        let pipeline = LoraPipeline::new(device, base, &lora.config, train.batch, train.seq, io)?;
        cumulative.compile_seconds += pipeline.compile_seconds;
        cumulative.compiles += pipeline.kernels() as u64;
        let schedule =
            LrSchedule { max_lr: train.lr, min_lr: train.min_lr, warmup_steps: train.warmup, total_steps: train.steps };
        let n = train.batch * train.seq;
        Ok(LoraTrainer {
            grads: vec![0.0; lora.len()],
            lora,
            adam,
            scaler,
            schedule,
            pipeline,
            sampler,
            train_data,
            val_data,
            io,
            step,
            cumulative,
            last_phases: PhasesMs::default(),
            device,
            train,
            inputs: vec![0; n],
            targets: vec![0; n],
        })
    }

    /// Continues a run from its checkpoint; `steps` may extend it.
    pub fn resume(
        device: &'d dyn Device,
        path: &Path,
        steps: Option<u64>,
        train_data: Dataset,
        val_data: Option<Dataset>,
    ) -> Result<LoraTrainer<'d>, TrainError> {
        let (meta, mut ckpt) = read(path)?;
        let err = |message: String| TrainError::Resume { path: path.into(), message };
        let mut array = |name: &str| ckpt.take_array(name).ok_or_else(|| err(format!("has no `{name}` array")));
        let base = Params::from_vec(&meta.config, array("base")?).map_err(|e| err(format!("base: {e}")))?;
        let lora = LoraParams::from_vec(&meta.config, &meta.lora, array("lora")?).map_err(err)?;
        let (m, v) = (array("adam.m")?, array("adam.v")?);
        if m.len() != lora.len() || v.len() != lora.len() {
            return Err(err("optimizer state does not match the adapters".into()));
        }
        let mut adam = AdamW::new(meta.adam, lora.len(), std::iter::once(0..lora.len()).collect())
            .map_err(|e| err(e.to_string()))?;
        (adam.m, adam.v, adam.step) = (m, v, meta.adam_step);
        let mut train = meta.train;
        if let Some(s) = steps {
            train.steps = s;
        }
        let sampler = data::Sampler::restore(meta.sampler);
        let state = (adam, meta.scaler, sampler, meta.step, meta.cumulative);
        LoraTrainer::assemble(device, base, lora, train, meta.io, state, train_data, val_data)
    }

    /// Writes a checkpoint of the whole state (atomically).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let meta = Meta {
            kind: CHECKPOINT_KIND.into(),
            config: self.pipeline.base().config().clone(),
            lora: self.lora.config.clone(),
            train: self.train.clone(),
            step: self.step,
            adam_step: self.adam.step,
            adam: self.adam.config,
            scaler: self.scaler.clone(),
            sampler: self.sampler.state(),
            cumulative: self.cumulative,
            io: self.io,
        };
        let arrays = vec![
            ("base".into(), self.pipeline.base().as_slice().to_vec()),
            ("lora".into(), self.lora.as_slice().to_vec()),
            ("adam.m".into(), self.adam.m.clone()),
            ("adam.v".into(), self.adam.v.clone()),
        ];
        let ckpt = Checkpoint { meta: serde_json::to_value(&meta).expect("checkpoint metadata serialises"), arrays };
        Ok(ckpt.write_atomic(path)?)
    }

    /// The frozen base.
    pub fn base(&self) -> &Params {
        self.pipeline.base()
    }

    /// Kernels compiled for the run (once).
    pub fn kernels(&self) -> usize {
        self.pipeline.kernels()
    }

    /// Bytes of optimizer state and gradients: the adapters' size, three times.
    pub fn optimizer_and_gradient_bytes(&self) -> usize {
        4 * (self.grads.len() + self.adam.m.len() + self.adam.v.len())
    }

    /// The start-of-run telemetry event.
    pub fn start_event(&self, precision: &str, resumed: bool) -> Event {
        let config = self.base().config().clone();
        let mut settings = serde_json::to_value(&self.train).expect("settings serialise");
        if let Some(map) = settings.as_object_mut() {
            map.insert("pipeline".into(), "lora".into());
            map.insert("lora".into(), serde_json::to_value(&self.lora.config).expect("serialises"));
            map.insert("trainable_params".into(), self.lora.len().into());
        }
        Event::Start {
            n_params: self.base().len(),
            tokens_per_step: self.train.batch * self.train.seq * self.train.accum,
            flops_per_step: self.flops().total() * self.train.accum as f64,
            config,
            device: self.device.name().to_string(),
            precision: precision.to_string(),
            pipeline: "lora".into(),
            settings,
            resumed_from_step: resumed.then_some(self.step),
        }
    }

    /// FLOPs of one micro-batch: the device's share as a full step's (forward and input
    /// gradients; the adapters' terms, `O(r·(in+out)·T)`, neglected); on the CPU only
    /// the classifier's forward and `dx` (`4·V·D·T`): no weight gradient at all.
    fn flops(&self) -> StepFlops {
        let c = self.base().config();
        let full = StepFlops::for_step(c, self.train.batch, self.train.seq);
        let t = (self.train.batch * self.train.seq) as f64;
        StepFlops { device: full.device, cpu: 4.0 * (c.vocab_size * c.dim) as f64 * t }
    }

    /// One optimizer step over the adapters (with `accum` micro-batches).
    pub fn step(&mut self, telemetry: &mut Telemetry) -> Result<StepInfo, TrainError> {
        let start = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr(step);
        self.grads.fill(0.0);
        let accum = self.train.accum;
        // With a loss mask (chat data) the step's loss is the mean over its loss tokens.
        let shares = LossShares::count(&self.train_data, &self.sampler, accum, &mut self.inputs, &mut self.targets);
        let mut loss_sum = 0.0f64;
        for micro in 0..accum {
            self.train_data.sample_batch(&mut self.sampler, &mut self.inputs, &mut self.targets);
            // Dropout masks drawn from the step and micro-batch: a resumed run draws the same.
            self.pipeline.set_dropout_seed(Some(dropout_seed(self.train.seed, step, micro)));
            let n_micro = data::loss_tokens(&self.targets);
            let grad_scale = shares.grad_scale(self.scaler.scale, n_micro);
            let loss =
                self.pipeline.forward_backward(&self.lora, &mut self.grads, &self.inputs, &self.targets, grad_scale)?;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite { step: step + 1, what: "loss", value: loss });
            }
            loss_sum += loss as f64 * shares.loss_weight(n_micro);
        }
        let loss = (loss_sum / accum as f64) as f32;
        let opt_start = Instant::now();
        let outcome = optim::step_with_scaling(
            &mut self.adam,
            &mut self.scaler,
            self.lora.as_mut_slice(),
            &self.grads,
            lr,
            self.train.clip,
        );
        let optimizer_ms = opt_start.elapsed().as_secs_f64() * 1e3;
        if !outcome.applied && !self.train.loss_scaling {
            return Err(TrainError::NonFinite { step: step + 1, what: "gradient norm", value: outcome.grad_norm });
        }
        let phases = self.pipeline.times.take();
        self.last_phases = PhasesMs::from_times(&phases, optimizer_ms);
        let secs = start.elapsed().as_secs_f64();
        self.step += 1;
        let tokens = (self.train.batch * self.train.seq * accum) as u64;
        let flops = self.flops();
        let c = &mut self.cumulative;
        c.steps += 1;
        c.tokens += tokens;
        c.train_seconds += secs;
        c.device_seconds += (phases.device_forward + phases.device_backward) / 1e3;
        c.device_flops += flops.device * accum as f64;
        c.total_flops += flops.total() * accum as f64;
        let info = StepInfo {
            step: self.step,
            loss,
            lr,
            grad_norm: outcome.grad_norm,
            ms: secs * 1e3,
            tokens_per_s: tokens as f64 / secs,
            val_loss: None,
            compile_stall_ms: None,
        };
        telemetry
            .emit(&Event::Step {
                step: self.step,
                loss,
                lr,
                grad_norm: outcome.grad_norm,
                tokens_per_s: info.tokens_per_s,
                gflops: flops.total() * accum as f64 / secs / 1e9,
                ms: info.ms,
                phases_ms: self.last_phases,
                loss_scale: self.train.loss_scaling.then_some(self.scaler.scale),
                compile_stall_ms: None,
                loss_tokens: Some(shares.total as u64),
            })
            .map_err(TrainError::Telemetry)?;
        Ok(info)
    }

    /// True when the validation loss is due after step `step` (1-based).
    pub fn eval_due(&self, step: u64) -> bool {
        self.val_data.is_some()
            && self.train.eval_every > 0
            && self.train.eval_batches > 0
            && (step.is_multiple_of(self.train.eval_every) || step == self.train.steps)
    }

    /// Mean validation loss over `eval_batches` fixed batches (as the trainer's).
    pub fn evaluate(&mut self) -> Result<Option<f32>, TrainError> {
        let Some(val) = self.val_data.as_ref().filter(|_| self.train.eval_batches > 0) else { return Ok(None) };
        let mut sampler = data::Sampler::new(self.train.seed ^ 0x5EED_0F5A_11E5);
        self.pipeline.set_dropout_seed(None); // evaluation: no dropout
        let mut sum = 0.0f64;
        let n = self.train.eval_batches;
        let shares = LossShares::count(val, &sampler, n, &mut self.inputs, &mut self.targets);
        for _ in 0..n {
            val.sample_batch(&mut sampler, &mut self.inputs, &mut self.targets);
            let weight = shares.loss_weight(data::loss_tokens(&self.targets));
            sum += self.pipeline.loss(&self.lora, &self.inputs, &self.targets)? as f64 * weight;
        }
        self.pipeline.times.take();
        Ok(Some((sum / n as f64) as f32))
    }

    pub fn report(&self) -> Report {
        Report::from_cumulative(&self.cumulative)
    }
}
