//! LoRA adapters: low-rank updates `W + s·B·A` of a frozen base's projections.
//!
//! For every targeted projection `W [out, in]` of every layer, an adapter holds
//! `A [r, in]` and `B [out, r]`, and the layer computes `y = W·x + s·B·(A·x)` with
//! `s = alpha / r`. Only `A` and `B` train; the base never gets a gradient or optimizer
//! state. Initialisation follows PEFT (`peft.tuners.lora.LoraLayer.reset_lora_parameters`
//! with `init_lora_weights=True`): `B = 0`, and `A` by
//! `nn.init.kaiming_uniform_(A, a=sqrt(5))`, which is `U(−1/√in, 1/√in)` (gain
//! `√(2/(1+a²)) = √(1/3)`, bound `gain·√(3/fan_in)`), so a fresh adapter changes nothing.
//!
//! The adapters live in one flat array (so the optimizer, checkpoints and gradient
//! buffers treat them as one vector): per layer, per target in [`LoraTarget::ALL`] order,
//! `A` then `B`, both row-major. The base keeps anetrain's conventions (llama2.c's
//! interleaved RoPE rows for `wq`, `wk`); [`crate::peft`]-style files convert at the edge.

use std::ops::Range;

use llama::params::TensorKind;
use llama::{Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A projection an adapter can target (`--lora-targets q,k,v,o,gate,up,down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// Every target, in the order adapters are stored.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }

    /// Parses [`LoraTarget::name`], or the Hugging Face module name (`q_proj`, …).
    pub fn parse(s: &str) -> Option<LoraTarget> {
        LoraTarget::ALL.into_iter().find(|t| t.name() == s || t.hf_module() == s)
    }

    /// The module name in Hugging Face Llama/Qwen2 models (PEFT's `target_modules`).
    pub fn hf_module(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`, `mlp.gate_proj`).
    pub fn hf_path(self) -> String {
        let block = if self.is_attention() { "self_attn" } else { "mlp" };
        format!("{block}.{}", self.hf_module())
    }

    /// True for q, k, v, o (the attention kernels' targets).
    pub fn is_attention(self) -> bool {
        matches!(self, LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O)
    }

    /// `(out, in)` of the projection in `config`.
    pub fn shape(self, config: &Config) -> (usize, usize) {
        let (dim, kv, hid) = (config.dim, config.kv_dim(), config.hidden_dim);
        match self {
            LoraTarget::Q | LoraTarget::O => (dim, dim),
            LoraTarget::K | LoraTarget::V => (kv, dim),
            LoraTarget::Gate | LoraTarget::Up => (hid, dim),
            LoraTarget::Down => (dim, hid),
        }
    }

    /// The base weight `[out, in]` of this projection in layer `l`.
    pub fn base(self, params: &Params, l: usize) -> &[f32] {
        let w = params.layer(l);
        match self {
            LoraTarget::Q => w.wq(),
            LoraTarget::K => w.wk(),
            LoraTarget::V => w.wv(),
            LoraTarget::O => w.wo(),
            LoraTarget::Gate => w.w1(),
            LoraTarget::Up => w.w3(),
            LoraTarget::Down => w.w2(),
        }
    }

    /// The base tensor's kind.
    pub fn kind(self) -> TensorKind {
        match self {
            LoraTarget::Q => TensorKind::Wq,
            LoraTarget::K => TensorKind::Wk,
            LoraTarget::V => TensorKind::Wv,
            LoraTarget::O => TensorKind::Wo,
            LoraTarget::Gate => TensorKind::W1,
            LoraTarget::Up => TensorKind::W3,
            LoraTarget::Down => TensorKind::W2,
        }
    }

    fn base_mut(self, params: &mut Params, l: usize) -> &mut [f32] {
        let spec = params.layout().find(self.kind(), Some(l)).expect("every layer has its projections").clone();
        params.get_mut(&spec)
    }
}

/// The default targets, as PEFT's for Llama models (`q_proj`, `v_proj`).
pub const DEFAULT_TARGETS: [LoraTarget; 2] = [LoraTarget::Q, LoraTarget::V];

/// PEFT's default `lora_alpha`.
pub const DEFAULT_ALPHA: f32 = 8.0;

/// What shapes a run's adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Dropout probability on the adapters' input (PEFT's `lora_dropout`).
    pub dropout: f32,
    /// Sorted, without duplicates.
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// A config with PEFT's defaults but for the rank.
    pub fn new(rank: usize) -> LoraConfig {
        LoraConfig { rank, alpha: DEFAULT_ALPHA, dropout: 0.0, targets: DEFAULT_TARGETS.to_vec() }
    }

    /// `alpha / rank`, the factor of `B·A`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Parses `--lora-targets` (`q,v`, `all`, or Hugging Face names such as `q_proj`).
    pub fn parse_targets(list: &str) -> Result<Vec<LoraTarget>, String> {
        if list.trim() == "all" {
            return Ok(LoraTarget::ALL.to_vec());
        }
        let mut targets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let t = LoraTarget::parse(item)
                .ok_or_else(|| format!("`{item}` is not a projection: give some of q,k,v,o,gate,up,down (or `all`)"))?;
            targets.push(t);
        }
        if targets.is_empty() {
            return Err("names no projection: give some of q,k,v,o,gate,up,down".into());
        }
        targets.sort();
        targets.dedup();
        Ok(targets)
    }

    /// Checks the settings against the model; errors name the flag.
    pub fn validate(&self, model: &Config) -> Result<(), String> {
        if self.rank == 0 {
            return Err("--lora: the rank must be at least 1".into());
        }
        let smallest = self.targets.iter().map(|t| t.shape(model).0.min(t.shape(model).1)).min().unwrap_or(0);
        if self.rank > smallest {
            return Err(format!(
                "--lora {}: larger than the smallest targeted projection side ({smallest}); a rank that high is not low-rank",
                self.rank
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("--lora-alpha {}: must be a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("--lora-dropout {}: must be in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return Err("--lora-targets: names no projection".into());
        }
        Ok(())
    }
}

/// Where one adapter sits in the flat array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSlot {
    pub layer: usize,
    pub target: LoraTarget,
    pub out: usize,
    pub inp: usize,
    /// `A [r, in]`.
    pub a: Range<usize>,
    /// `B [out, r]`.
    pub b: Range<usize>,
}

/// Every adapter of a model, in one allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraParams {
    pub config: LoraConfig,
    slots: Vec<AdapterSlot>,
    data: Vec<f32>,
}

impl LoraParams {
    /// The layout for `model` and `config`, all zeros.
    pub fn zeros(model: &Config, config: &LoraConfig) -> LoraParams {
        let r = config.rank;
        let mut slots = Vec::new();
        let mut at = 0;
        for layer in 0..model.n_layers {
            for &target in &config.targets {
                let (out, inp) = target.shape(model);
                let a = at..at + r * inp;
                let b = a.end..a.end + out * r;
                at = b.end;
                slots.push(AdapterSlot { layer, target, out, inp, a, b });
            }
        }
        LoraParams { config: config.clone(), slots, data: vec![0.0; at] }
    }

    /// Fresh adapters as PEFT makes them: `A ~ U(−1/√in, 1/√in)`, `B = 0`. Deterministic
    /// in `seed` (ChaCha8).
    pub fn init(model: &Config, config: &LoraConfig, seed: u64) -> LoraParams {
        let mut p = LoraParams::zeros(model, config);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in 0..p.slots.len() {
            let s = p.slots[i].clone();
            let bound = 1.0 / (s.inp as f32).sqrt();
            for v in &mut p.data[s.a] {
                *v = rng.gen_range(-bound..bound);
            }
        }
        p
    }

    /// Wraps a flat array laid out as [`LoraParams::zeros`] lays it.
    pub fn from_vec(model: &Config, config: &LoraConfig, data: Vec<f32>) -> Result<LoraParams, String> {
        let mut p = LoraParams::zeros(model, config);
        if data.len() != p.data.len() {
            return Err(format!("{} adapter values, the model and LoRA config need {}", data.len(), p.data.len()));
        }
        p.data = data;
        Ok(p)
    }

    pub fn slots(&self) -> &[AdapterSlot] {
        &self.slots
    }

    /// The slot of `target` in layer `l`, if targeted.
    pub fn slot(&self, l: usize, target: LoraTarget) -> Option<&AdapterSlot> {
        let per_layer = self.config.targets.len();
        self.slots[l * per_layer..(l + 1) * per_layer].iter().find(|s| s.target == target)
    }

    /// `(A [r, in], B [out, r])` of `target` in layer `l`.
    pub fn adapter(&self, l: usize, target: LoraTarget) -> Option<(&[f32], &[f32])> {
        let s = self.slot(l, target)?;
        Some((&self.data[s.a.clone()], &self.data[s.b.clone()]))
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The merged weights: `W + s·B·A` for every targeted projection of `base`.
    pub fn merge(&self, base: &Params) -> Params {
        let mut merged = base.clone();
        self.merge_into(&mut merged);
        merged
    }

    /// Adds `s·B·A` to every targeted projection of `params` (in place).
    pub fn merge_into(&self, params: &mut Params) {
        let (r, scale) = (self.config.rank, self.config.scale());
        for s in &self.slots {
            let (a, b) = (&self.data[s.a.clone()], &self.data[s.b.clone()]);
            let w = s.target.base_mut(params, s.layer);
            // W [out, in] += s · B [out, r] · A [r, in], summed in f64 so the merge adds
            // one rounding per weight.
            for o in 0..s.out {
                for i in 0..s.inp {
                    let d: f64 = (0..r).map(|j| f64::from(b[o * r + j]) * f64::from(a[j * s.inp + i])).sum();
                    w[o * s.inp + i] += (f64::from(scale) * d) as f32;
                }
            }
        }
    }

    /// The gradients of the adapters from the gradients of the merged weights (the chain
    /// rule through `W' = W + s·B·A`): `dA = s·Bᵀ·dW'`, `dB = s·dW'·Aᵀ`. A reference for
    /// tests, from any pipeline's full gradient.
    pub fn grads_from_full(&self, full: &Params) -> Vec<f32> {
        let (r, scale) = (self.config.rank, f64::from(self.config.scale()));
        let mut g = vec![0.0f32; self.data.len()];
        for s in &self.slots {
            let (a, b) = (&self.data[s.a.clone()], &self.data[s.b.clone()]);
            let dw = s.target.base(full, s.layer);
            for j in 0..r {
                for i in 0..s.inp {
                    let v: f64 = (0..s.out).map(|o| f64::from(b[o * r + j]) * f64::from(dw[o * s.inp + i])).sum();
                    g[s.a.start + j * s.inp + i] = (scale * v) as f32;
                }
            }
            for o in 0..s.out {
                for j in 0..r {
                    let v: f64 = (0..s.inp).map(|i| f64::from(dw[o * s.inp + i]) * f64::from(a[j * s.inp + i])).sum();
                    g[s.b.start + o * r + j] = (scale * v) as f32;
                }
            }
        }
        g
    }
}

/// Rounds every projection matrix of `params` to the nearest fp16 number, as the LoRA
/// pipeline's baked constants hold them, so the CPU's parts of the model (embedding,
/// norms, classifier) and exports see the same base as the kernels.
pub fn round_base_to_fp16(params: &mut Params) {
    let specs: Vec<_> = params.layout().specs().to_vec();
    for spec in specs {
        if LoraTarget::ALL.iter().any(|t| t.kind() == spec.kind) {
            for v in params.get_mut(&spec) {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_sort_and_name_the_bad_one() {
        assert_eq!(LoraConfig::parse_targets("v,q").unwrap(), vec![LoraTarget::Q, LoraTarget::V]);
        assert_eq!(LoraConfig::parse_targets("q_proj,down,q").unwrap(), vec![LoraTarget::Q, LoraTarget::Down]);
        assert_eq!(LoraConfig::parse_targets("all").unwrap().len(), 7);
        let e = LoraConfig::parse_targets("q,mlp").unwrap_err();
        assert!(e.contains("`mlp`"), "{e}");
    }

    #[test]
    fn init_is_peft_kaiming_uniform_and_b_zero() {
        let model = Config::preset("tiny").unwrap();
        let cfg = LoraConfig { targets: LoraTarget::ALL.to_vec(), ..LoraConfig::new(4) };
        let p = LoraParams::init(&model, &cfg, 7);
        for s in p.slots() {
            let bound = 1.0 / (s.inp as f32).sqrt();
            let a = &p.as_slice()[s.a.clone()];
            assert!(a.iter().all(|v| v.abs() < bound));
            // Uniform on (−b, b): the mean square is b²/3; with ≥ 256 samples within 30 %.
            let ms = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
            assert!((ms / (bound * bound / 3.0) - 1.0).abs() < 0.3, "{ms}");
            assert!(p.as_slice()[s.b.clone()].iter().all(|&v| v == 0.0));
        }
        // A fresh adapter merges to the base exactly.
        let base = Params::init(&model, 1).unwrap();
        assert_eq!(p.merge(&base), base);
    }
}
