//! The optimizer end of a training step: AdamW, global-norm gradient clipping, the
//! learning-rate schedule and dynamic loss scaling for fp16.
//!
//! Parameters and gradients are each one flat `[f32]` (llm.c's single allocation with
//! named views); AdamW learns which index ranges are matrices (weight-decayed) once, at
//! construction. All state here is plain data with serde derives, so a checkpoint can
//! save it and a resumed run continues bit-identically.
//!
//! One step, with loss scaling `S` (1 in fp32) and gradient accumulation over `k`
//! micro-batches: every micro-batch's backward is seeded with `S / k` (the classifier's
//! `grad_scale`), so the accumulated gradients are `S ×` the gradient of the mean loss.
//! Then [`step_with_scaling`] measures the true norm (`‖g‖ / S`), skips the update and
//! halves `S` if anything overflowed, and otherwise hands AdamW the factor that both
//! unscales and clips, so the gradients are read once.
//!
//! ```
//! use train::optim::{AdamW, AdamWConfig, LossScaler, LrSchedule, step_with_scaling};
//! let mut params = vec![1.0f32; 6];
//! let grads = vec![0.5f32; 6];
//! // Elements 0..4 are a matrix (decayed), 4..6 an RMSNorm weight (not decayed).
//! let mut adam = AdamW::new(AdamWConfig::default(), params.len(), vec![0..4]).unwrap();
//! let mut scaler = LossScaler::disabled();
//! let schedule = LrSchedule { max_lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 100 };
//! let outcome = step_with_scaling(&mut adam, &mut scaler, &mut params, &grads, schedule.lr(5), 1.0);
//! assert!(outcome.applied && params[0] < 1.0);
//! ```

use std::ops::Range;

use device::cpu::simd;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Parameters per rayon task in the optimizer's passes (memory-bound: 4 arrays stream).
const OPTIM_CHUNK: usize = 32 * 1024;

/// What is wrong with an optimizer's construction or restored state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    #[error("weight-decay range {start}..{end} is outside the {n_params} parameters")]
    DecayRangeOutOfBounds { start: usize, end: usize, n_params: usize },
    #[error(
        "weight-decay ranges {first:?} and {second:?} overlap or are out of order (give them sorted and disjoint)"
    )]
    DecayRangesOverlap { first: Range<usize>, second: Range<usize> },
    #[error("optimizer state `{what}` holds {found} values, expected {expected} (one per parameter)")]
    StateLength { what: &'static str, found: usize, expected: usize },
}

// ---------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------

/// AdamW's hyperparameters (the learning rate comes from the schedule at each step).
///
/// f64, as PyTorch keeps them in Python floats: the per-step constants (`1 − β`, the
/// bias corrections) are formed in double precision and only then rounded to f32.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay: each decayed parameter is multiplied by `1 − lr·wd`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// llama2.c train.py's settings (β1 0.9, β2 0.95, weight decay 0.1) and PyTorch's ε 1e-8.
    fn default() -> AdamWConfig {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// AdamW as PyTorch's `torch.optim.AdamW` (non-AMSGrad) computes it, over one flat
/// parameter vector, with weight decay only on the given index ranges (the matrices;
/// norms' weights are not decayed, as in llama2.c).
///
/// Per parameter, at step `n` (counted from 1):
/// ```text
/// p ← p·(1 − lr·wd)                       (decayed ranges only)
/// m ← β1·m + (1 − β1)·g
/// v ← β2·v + (1 − β2)·g²
/// p ← p − lr/(1 − β1ⁿ) · m / (sqrt(v)/sqrt(1 − β2ⁿ) + ε)
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates applied so far (PyTorch's `step`), for the bias corrections.
    pub step: u64,
    /// First moments, one per parameter.
    pub m: Vec<f32>,
    /// Second moments, one per parameter.
    pub v: Vec<f32>,
    /// Sorted, disjoint index ranges that receive weight decay.
    decayed: Vec<Range<usize>>,
}

impl AdamW {
    /// Zeroed state for `n_params` parameters; `decayed` lists the index ranges of the
    /// weight-decayed tensors, sorted and disjoint.
    pub fn new(config: AdamWConfig, n_params: usize, decayed: Vec<Range<usize>>) -> Result<AdamW, OptimError> {
        let adam = AdamW { config, step: 0, m: vec![0.0; n_params], v: vec![0.0; n_params], decayed };
        adam.check()?;
        Ok(adam)
    }

    /// Checks internal consistency, for state that came from a file.
    pub fn check(&self) -> Result<(), OptimError> {
        let n_params = self.m.len();
        if self.v.len() != n_params {
            return Err(OptimError::StateLength { what: "v", found: self.v.len(), expected: n_params });
        }
        for (i, range) in self.decayed.iter().enumerate() {
            if range.start > range.end || range.end > n_params {
                return Err(OptimError::DecayRangeOutOfBounds { start: range.start, end: range.end, n_params });
            }
            if i > 0 && self.decayed[i - 1].end > range.start {
                return Err(OptimError::DecayRangesOverlap {
                    first: self.decayed[i - 1].clone(),
                    second: range.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn n_params(&self) -> usize {
        self.m.len()
    }

    /// The weight-decayed index ranges.
    pub fn decayed(&self) -> &[Range<usize>] {
        &self.decayed
    }

    /// Applies one update with learning rate `lr` to gradients `grads[i] · grad_scale`
    /// (`grad_scale` folds in loss unscaling and clipping so gradients are read once).
    ///
    /// # Panics
    /// If `params` or `grads` do not hold [`AdamW::n_params`] values.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f32, grad_scale: f32) {
        let n_params = self.n_params();
        assert_eq!(params.len(), n_params, "params length differs from the optimizer state");
        assert_eq!(grads.len(), n_params, "grads length differs from the optimizer state");
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let lr64 = f64::from(lr);
        let bias1 = 1.0 - beta1.powf(self.step as f64);
        let bias2 = 1.0 - beta2.powf(self.step as f64);
        let coefficients = Coefficients {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: eps as f32,
            step_size: (lr64 / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            grad_scale,
        };
        // Walk [0, n) as alternating undecayed gaps and decayed ranges.
        let decay_keep = (1.0 - lr64 * weight_decay) as f32;
        let mut cursor = 0;
        for i in 0..=self.decayed.len() {
            let decayed = self.decayed.get(i).cloned().unwrap_or(n_params..n_params);
            for (range, keep) in [(cursor..decayed.start, 1.0), (decayed.clone(), decay_keep)] {
                update_range(
                    &mut params[range.clone()],
                    &grads[range.clone()],
                    &mut self.m[range.clone()],
                    &mut self.v[range],
                    keep,
                    &coefficients,
                );
            }
            cursor = decayed.end;
        }
    }
}

/// The per-step constants of the AdamW update.
struct Coefficients {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// `lr / (1 − β1ⁿ)`
    step_size: f32,
    /// `1 / sqrt(1 − β2ⁿ)`
    inv_sqrt_bias2: f32,
    grad_scale: f32,
}

/// The AdamW update of one contiguous range; `keep` is `1 − lr·wd` or 1.
fn update_range(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], keep: f32, c: &Coefficients) {
    p.par_chunks_mut(OPTIM_CHUNK)
        .zip(m.par_chunks_mut(OPTIM_CHUNK).zip(v.par_chunks_mut(OPTIM_CHUNK)))
        .zip(g.par_chunks(OPTIM_CHUNK))
        .for_each(|((p, (m, v)), g)| {
            simd(
                #[inline(always)]
                || {
                    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                        let g = g * c.grad_scale;
                        *m = c.beta1 * *m + c.one_minus_beta1 * g;
                        *v = c.beta2 * *v + c.one_minus_beta2 * g * g;
                        *p = *p * keep - c.step_size * *m / (v.sqrt() * c.inv_sqrt_bias2 + c.eps);
                    }
                },
            )
        });
}

// ---------------------------------------------------------------------------------------
// Gradient norm and clipping
// ---------------------------------------------------------------------------------------

/// The global L2 norm of all gradients, summed in f64 (so no finite f32 gradient can
/// overflow the sum). Non-finite exactly when some gradient is inf or NaN, which is how
/// loss scaling detects an overflow.
pub fn grad_norm(grads: &[f32]) -> f32 {
    let sum_sq: f64 = grads
        .par_chunks(OPTIM_CHUNK)
        .map(|chunk| {
            // Independent f64 lanes so the loop vectorises (one running sum would not).
            let mut lanes = [0.0f64; 8];
            let mut exact = chunk.chunks_exact(lanes.len());
            for group in &mut exact {
                for (lane, &g) in lanes.iter_mut().zip(group) {
                    *lane += f64::from(g) * f64::from(g);
                }
            }
            let tail: f64 = exact.remainder().iter().map(|&g| f64::from(g) * f64::from(g)).sum();
            lanes.iter().sum::<f64>() + tail
        })
        .sum();
    sum_sq.sqrt() as f32
}

/// The factor that brings a gradient of norm `norm` down to `max_norm`, as PyTorch's
/// `clip_grad_norm_`: `max_norm / (norm + 1e-6)` capped at 1. `max_norm <= 0` disables
/// clipping (factor 1).
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scales `grads` in place so their global norm is at most `max_norm` (0 disables) and
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    let factor = clip_factor(norm, max_norm);
    if factor < 1.0 {
        grads.par_chunks_mut(OPTIM_CHUNK).for_each(|chunk| chunk.iter_mut().for_each(|g| *g *= factor));
    }
    norm
}

// ---------------------------------------------------------------------------------------
// Learning-rate schedule
// ---------------------------------------------------------------------------------------

/// Linear warmup from 0 to `max_lr` over `warmup_steps`, then cosine decay to `min_lr`
/// at `total_steps`, constant after — llama2.c train.py's `get_lr` (its `lr_decay_iters`
/// is `total_steps`). As there, step 0 has learning rate 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate at `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        let (max_lr, min_lr) = (f64::from(self.max_lr), f64::from(self.min_lr));
        if step < self.warmup_steps {
            return (max_lr * step as f64 / self.warmup_steps as f64) as f32;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let decay_ratio = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
        (min_lr + coeff * (max_lr - min_lr)) as f32
    }
}

// ---------------------------------------------------------------------------------------
// Dynamic loss scaling
// ---------------------------------------------------------------------------------------

/// PyTorch `GradScaler`'s initial scale, 2¹⁶.
pub const DEFAULT_INITIAL_SCALE: f32 = 65536.0;
/// PyTorch `GradScaler`'s growth interval: good steps between doublings.
pub const DEFAULT_GROWTH_INTERVAL: u32 = 2000;
/// Ceiling on the scale, 2²⁴: fp16's largest value is 65504, so a gradient scaled further
/// is already mostly beyond it; the cap also keeps the scale finite.
pub const MAX_LOSS_SCALE: f32 = 16_777_216.0;

/// Dynamic loss scaling for fp16 gradients, as PyTorch's `GradScaler`: the loss gradient
/// is multiplied by `scale` so small gradients survive fp16's range; a step whose
/// gradients overflowed (any inf/NaN) is skipped and the scale halved; after
/// `growth_interval` good steps in a row the scale doubles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    /// Good steps needed to double the scale; 0 never grows.
    pub growth_interval: u32,
    /// Good steps since the scale last changed.
    pub good_steps: u32,
    /// Steps skipped for overflow so far (telemetry).
    pub skipped_steps: u64,
}

impl LossScaler {
    pub fn new(initial_scale: f32, growth_interval: u32) -> LossScaler {
        LossScaler { scale: initial_scale, growth_interval, good_steps: 0, skipped_steps: 0 }
    }

    /// PyTorch's defaults: scale 2¹⁶, doubling every 2000 good steps.
    pub fn fp16() -> LossScaler {
        LossScaler::new(DEFAULT_INITIAL_SCALE, DEFAULT_GROWTH_INTERVAL)
    }

    /// No scaling (fp32): the scale stays 1; a non-finite step is still skipped.
    pub fn disabled() -> LossScaler {
        LossScaler::new(1.0, 0)
    }

    /// Records whether this step's gradients were all finite and returns whether the
    /// step should be applied.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !grads_finite {
            self.skipped_steps += 1;
            self.good_steps = 0;
            if self.growth_interval > 0 {
                self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
            }
            return false;
        }
        self.good_steps += 1;
        if self.growth_interval > 0 && self.good_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(MAX_LOSS_SCALE);
            self.good_steps = 0;
        }
        true
    }
}

/// What [`step_with_scaling`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Global norm of the unscaled gradients, before clipping (inf/NaN on overflow).
    pub grad_norm: f32,
    /// Whether the parameters were updated (false: overflow, step skipped).
    pub applied: bool,
    /// The loss scale to use for the *next* step.
    pub next_scale: f32,
}

/// One optimizer step on gradients that carry the loss scale `scaler.scale`: measure
/// the unscaled norm; on overflow skip and back off; else update with the factor that
/// unscales and clips to `max_norm` (0 disables clipping).
pub fn step_with_scaling(
    adam: &mut AdamW,
    scaler: &mut LossScaler,
    params: &mut [f32],
    grads: &[f32],
    lr: f32,
    max_norm: f32,
) -> StepOutcome {
    let scale = scaler.scale;
    let norm = grad_norm(grads) / scale;
    let applied = scaler.update(norm.is_finite());
    if applied {
        adam.update(params, grads, lr, clip_factor(norm, max_norm) / scale);
    }
    StepOutcome { grad_norm: norm, applied, next_scale: scaler.scale }
}
