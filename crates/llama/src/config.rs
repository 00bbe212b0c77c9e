//! The shape of a Llama model: widths, depths, vocabulary, context, and the few numeric
//! constants (RMSNorm ε, RoPE θ) that decide its arithmetic.

use serde::{Deserialize, Serialize};

use crate::error::{err, Result};

/// RMSNorm ε of Llama 2 and llama2.c (`model.py` ModelArgs.norm_eps, run.c `1e-5f`).
pub const DEFAULT_NORM_EPS: f32 = 1e-5;
/// RoPE base θ of Llama 2 and llama2.c (`precompute_freqs_cis(theta=10000.0)`).
pub const DEFAULT_ROPE_THETA: f32 = 10000.0;

// Sanity bounds. They exist to turn a corrupt header into an error instead of an
// allocation of absurd size; they sit far above the largest open Llama (Llama 3.1 405B:
// dim 16384, hidden 53248, 126 layers, 128 heads, vocab 128256, context 131072).
pub const MAX_DIM: usize = 1 << 16;
pub const MAX_HIDDEN_DIM: usize = 1 << 18;
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_HEADS: usize = 1 << 10;
pub const MAX_VOCAB: usize = 1 << 21;
pub const MAX_SEQ_LEN: usize = 1 << 20;

/// A Llama-family model's hyper-parameters.
///
/// `kv_dim = head_dim · n_kv_heads`; with `n_kv_heads < n_heads` the model uses
/// grouped-query attention (each K/V head serves `n_heads / n_kv_heads` query heads).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Width of the residual stream.
    pub dim: usize,
    /// Width of the SwiGLU feed-forward hidden layer.
    pub hidden_dim: usize,
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    /// Longest sequence (context) the model is trained or run with.
    pub seq_len: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// Whether the Q, K and V projections carry biases (Qwen-style); llama2.c's don't.
    #[serde(default)]
    pub qkv_bias: bool,
    /// Whether the classifier reuses the token embedding (weight tying).
    #[serde(default = "default_shared_classifier")]
    pub shared_classifier: bool,
    /// Width of one attention head when it is not `dim / n_heads` (Qwen3-0.6B: 128 with
    /// dim 1024 and 16 heads, so the queries are 2048 wide). `None`: `dim / n_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit_head_dim: Option<usize>,
    /// Per-head RMSNorm of the queries and keys before RoPE, with a learned gain of
    /// `head_dim` values each (Qwen3's `q_norm` and `k_norm`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// RoPE's frequencies rescaled for long contexts (Llama 3.1/3.2's `"llama3"` type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// A RoPE frequency scaling. Only the `llama3` rule exists (transformers
/// `_compute_llama3_parameters`): wavelengths shorter than
/// `original_max_position_embeddings / high_freq_factor` keep their frequency, those
/// longer than `… / low_freq_factor` are divided by `factor`, and those between are
/// interpolated smoothly. It changes no attention scale.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

impl RopeScaling {
    /// `freq` (radians per position) after scaling (in f64; the factors are f32).
    pub fn apply(&self, freq: f64) -> f64 {
        match *self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low_freq_factor, high_freq_factor) =
                    (f64::from(factor), f64::from(low_freq_factor), f64::from(high_freq_factor));
                let old_context = original_max_position_embeddings as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old_context / high_freq_factor {
                    freq
                } else if wavelen > old_context / low_freq_factor {
                    freq / factor
                } else {
                    let smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                }
            }
        }
    }

    fn validate(&self) -> Result<()> {
        match *self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                for (field, v) in
                    [("factor", factor), ("low_freq_factor", low_freq_factor), ("high_freq_factor", high_freq_factor)]
                {
                    if !(v.is_finite() && v > 0.0) {
                        return Err(err!(Config, "rope_scaling.{field} is {v}; it must be finite and positive"));
                    }
                }
                if high_freq_factor <= low_freq_factor {
                    return Err(err!(
                        Config,
                        "rope_scaling.high_freq_factor {high_freq_factor} must be above low_freq_factor {low_freq_factor}"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err(err!(
                        Config,
                        "rope_scaling.original_max_position_embeddings is 0; it must be positive"
                    ));
                }
                Ok(())
            }
        }
    }
}

fn default_norm_eps() -> f32 {
    DEFAULT_NORM_EPS
}
fn default_rope_theta() -> f32 {
    DEFAULT_ROPE_THETA
}
fn default_shared_classifier() -> bool {
    true
}

/// The names [`Config::preset`] knows, smallest first.
pub const PRESETS: &[&str] =
    &["tiny", "stories260k", "stories15m", "stories42m", "stories110m", "smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b"];

impl Config {
    /// A config with llama2.c's defaults for everything but the shape: ε = 1e-5, θ = 10000,
    /// no QKV bias, shared classifier.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        hidden_dim: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        vocab_size: usize,
        seq_len: usize,
    ) -> Config {
        Config {
            dim,
            hidden_dim,
            n_layers,
            n_heads,
            n_kv_heads,
            vocab_size,
            seq_len,
            norm_eps: DEFAULT_NORM_EPS,
            rope_theta: DEFAULT_ROPE_THETA,
            qkv_bias: false,
            shared_classifier: true,
            explicit_head_dim: None,
            qk_norm: false,
            rope_scaling: None,
        }
    }

    /// A named preset (see [`PRESETS`]):
    ///
    /// | name | dim | hidden | layers | heads | kv heads | vocab | seq |
    /// |---|---|---|---|---|---|---|---|
    /// | `tiny` | 64 | 192 | 4 | 4 | 2 | 512 | 128 |
    /// | `stories260k` | 64 | 172 | 5 | 8 | 4 | 512 | 512 |
    /// | `stories15m` | 288 | 768 | 6 | 6 | 6 | 32000 | 256 |
    /// | `stories42m` | 512 | 1376 | 8 | 8 | 8 | 32000 | 1024 |
    /// | `stories110m` | 768 | 2048 | 12 | 12 | 12 | 32000 | 1024 |
    /// | `smollm2-135m` | 576 | 1536 | 30 | 9 | 3 | 49152 | 8192 |
    /// | `qwen2.5-0.5b` | 896 | 4864 | 24 | 14 | 2 | 151936 | 32768 |
    /// | `qwen3-0.6b` | 1024 | 3072 | 28 | 16 (of 128) | 8 | 151936 | 40960 |
    ///
    /// The last three are the shapes of the Hugging Face models (their config.json:
    /// HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B) with their
    /// features — θ, ε, tying, Qwen2.5's QKV biases, Qwen3's QK-norm and 128-wide heads —
    /// for benchmarks and cost models with random weights; fine-tuning starts from the
    /// real folders (`train --init DIR`).
    ///
    /// The `stories*` shapes are karpathy/tinyllamas' published checkpoints; their
    /// hidden widths (except 260K's hand-picked 172) follow [`llama_hidden_dim`].
    /// `tiny` is the built-in default for training from scratch: ≈0.23 M parameters, so
    /// a few hundred steps take about a minute on two CPU cores. Its hidden width is
    /// `llama_hidden_dim(64) = 192` rather than 260K's 172 so every matmul inner
    /// dimension is a multiple of 32 (a reported ANE limit, see DESIGN.md).
    pub fn preset(name: &str) -> Option<Config> {
        let config = match name {
            "tiny" => Config::new(64, llama_hidden_dim(64), 4, 4, 2, 512, 128),
            "stories260k" => Config::new(64, 172, 5, 8, 4, 512, 512),
            "stories15m" => Config::new(288, llama_hidden_dim(288), 6, 6, 6, 32000, 256),
            "stories42m" => Config::new(512, llama_hidden_dim(512), 8, 8, 8, 32000, 1024),
            "stories110m" => Config::new(768, llama_hidden_dim(768), 12, 12, 12, 32000, 1024),
            "smollm2-135m" => Config { rope_theta: 100_000.0, ..Config::new(576, 1536, 30, 9, 3, 49152, 8192) },
            "qwen2.5-0.5b" => Config {
                norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                qkv_bias: true,
                ..Config::new(896, 4864, 24, 14, 2, 151_936, 32768)
            },
            "qwen3-0.6b" => Config {
                norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                qk_norm: true,
                explicit_head_dim: Some(128),
                ..Config::new(1024, 3072, 28, 16, 8, 151_936, 40960)
            },
            _ => return None,
        };
        Some(config)
    }

    /// Width of one attention head: `dim / n_heads` unless set apart
    /// ([`explicit_head_dim`](Config::explicit_head_dim)).
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim.unwrap_or(self.dim / self.n_heads)
    }

    /// Width of the query projection (and of Wo's input): `head_dim · n_heads`, which is
    /// `dim` unless the head width is set apart.
    pub fn q_dim(&self) -> usize {
        self.head_dim() * self.n_heads
    }

    /// RoPE's angular frequency of each rotated pair `i < head_dim / 2`:
    /// `θ^(-2i/head_dim)`, then [`rope_scaling`](Config::rope_scaling) if any. Computed in
    /// f32 as llama2.c and transformers do.
    pub fn rope_freqs(&self) -> Vec<f32> {
        let head_dim = self.head_dim();
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf((2 * i) as f32 / head_dim as f32);
                self.rope_scaling.map_or(freq, |s| s.apply(f64::from(freq)) as f32)
            })
            .collect()
    }

    /// Width of the key and value projections: `head_dim · n_kv_heads`.
    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.n_kv_heads
    }

    /// How many query heads share one K/V head: `n_heads / n_kv_heads`.
    pub fn kv_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Number of trainable scalars, as laid out by [`Params`](crate::Params): embedding,
    /// per layer 2 norms + Wq, Wk, Wv (+ 3 biases) (+ 2 QK-norm gains) + Wo + W1, W2, W3,
    /// final norm, and a separate classifier when not shared. llama2.c's `freq_cis`
    /// tables are not parameters.
    pub fn n_params(&self) -> usize {
        let (dim, q_dim, kv_dim, hidden) = (self.dim, self.q_dim(), self.kv_dim(), self.hidden_dim);
        let per_layer = 2 * dim                 // rms_att, rms_ffn
            + q_dim * dim + 2 * kv_dim * dim    // wq, wk, wv
            + dim * q_dim                       // wo
            + 3 * hidden * dim                  // w1, w2, w3
            + if self.qkv_bias { q_dim + 2 * kv_dim } else { 0 }
            + if self.qk_norm { 2 * self.head_dim() } else { 0 };
        let classifier = if self.shared_classifier { 0 } else { self.vocab_size * dim };
        self.vocab_size * dim + self.n_layers * per_layer + dim + classifier
    }

    /// Whether llama2.c's model.bin can hold this model: no head width set apart, no
    /// QK-norm, no RoPE scaling (biases and an unshared classifier have their own checks
    /// in the writer). `Err` names what does not fit.
    pub fn llama2c_compatible(&self) -> std::result::Result<(), &'static str> {
        if self.explicit_head_dim.is_some_and(|h| h * self.n_heads != self.dim) {
            return Err("a head width other than dim / n_heads");
        }
        if self.qk_norm {
            return Err("QK-norm (per-head RMSNorm of queries and keys)");
        }
        if self.rope_scaling.is_some() {
            return Err("RoPE scaling");
        }
        Ok(())
    }

    /// Checks that the shape is usable: every size positive and below its sanity bound,
    /// `dim` divisible by `n_heads` (unless the head width is set apart), `n_heads` by
    /// `n_kv_heads`, an even head width (RoPE rotates pairs), finite positive ε and θ, a
    /// sound RoPE scaling. Errors name the field and its value.
    pub fn validate(&self) -> Result<()> {
        let bounded = [
            ("dim", self.dim, MAX_DIM),
            ("hidden_dim", self.hidden_dim, MAX_HIDDEN_DIM),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("n_kv_heads", self.n_kv_heads, MAX_HEADS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("seq_len", self.seq_len, MAX_SEQ_LEN),
        ];
        for (field, value, max) in bounded {
            if value == 0 {
                return Err(err!(Config, "{field} is 0; it must be positive"));
            }
            if value > max {
                return Err(err!(Config, "{field} is {value}, above the sanity limit {max}"));
            }
        }
        match self.explicit_head_dim {
            Some(0) => return Err(err!(Config, "head_dim is 0; it must be positive")),
            Some(h) if h > MAX_DIM => return Err(err!(Config, "head_dim is {h}, above the sanity limit {MAX_DIM}")),
            Some(h) if h * self.n_heads > MAX_DIM => {
                return Err(err!(Config, "head_dim {h} · n_heads {} is above the sanity limit {MAX_DIM}", self.n_heads))
            }
            Some(_) => {}
            None => {
                if !self.dim.is_multiple_of(self.n_heads) {
                    return Err(err!(Config, "dim {} is not divisible by n_heads {}", self.dim, self.n_heads));
                }
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(err!(
                Config,
                "n_heads {} is not divisible by n_kv_heads {} (grouped-query attention needs whole groups)",
                self.n_heads,
                self.n_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(match self.explicit_head_dim {
                Some(h) => err!(Config, "head_dim is {h}; RoPE needs it even"),
                None => err!(
                    Config,
                    "head_dim (dim {} / n_heads {}) is {}; RoPE needs it even",
                    self.dim,
                    self.n_heads,
                    self.head_dim()
                ),
            });
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(err!(Config, "norm_eps is {}; it must be finite and positive", self.norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(err!(Config, "rope_theta is {}; it must be finite and positive", self.rope_theta));
        }
        Ok(())
    }
}

/// Llama's feed-forward width for a model width: `multiple_of · ceil((2/3 · 4·dim) / multiple_of)`
/// with `multiple_of = 32`, i.e. `32·ceil(8·dim/3/32)` (llama2.c `model.py` ModelArgs).
pub fn llama_hidden_dim(dim: usize) -> usize {
    const MULTIPLE_OF: usize = 32;
    let hidden = 2 * (4 * dim) / 3;
    hidden.div_ceil(MULTIPLE_OF) * MULTIPLE_OF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_dim_formula_matches_published_checkpoints() {
        // 32·ceil(8·dim/3/32), evaluated in exact rational arithmetic.
        let formula = |dim: usize| 32 * (8 * dim).div_ceil(3 * 32);
        for (dim, hidden) in [(288, 768), (512, 1376), (768, 2048), (64, 192)] {
            assert_eq!(llama_hidden_dim(dim), hidden, "dim {dim}");
            assert_eq!(formula(dim), hidden, "dim {dim}");
        }
    }

    #[test]
    fn presets_are_valid_and_have_published_shapes() {
        for name in PRESETS {
            let c = Config::preset(name).unwrap();
            c.validate().unwrap();
        }
        let c = Config::preset("stories15m").unwrap();
        assert_eq!((c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads), (288, 768, 6, 6, 6));
        assert_eq!((c.vocab_size, c.seq_len), (32000, 256));
        let c = Config::preset("stories260k").unwrap();
        assert_eq!((c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads), (64, 172, 5, 8, 4));
        assert_eq!((c.head_dim(), c.kv_dim(), c.kv_group()), (8, 32, 2));
        assert!(Config::preset("stories7b").is_none());
        // The Hugging Face shapes: parameter counts as their model cards give them
        // (Qwen3-0.6B: 0.6 B with tied embeddings, 0.44 B without the embedding).
        let c = Config::preset("qwen3-0.6b").unwrap();
        assert_eq!((c.head_dim(), c.q_dim(), c.kv_dim()), (128, 2048, 1024));
        assert_eq!(c.n_params(), 596_049_920);
        assert_eq!(c.n_params() - c.vocab_size * c.dim, 440_467_456);
        let c = Config::preset("qwen2.5-0.5b").unwrap();
        assert_eq!(c.n_params(), 494_032_768);
        let c = Config::preset("smollm2-135m").unwrap();
        assert_eq!(c.n_params(), 134_515_008);
    }

    #[test]
    fn n_params_matches_known_sizes() {
        // stories260K.bin is 28 header bytes + 4·(params + 2·seq_len·head_dim/2) bytes.
        let c = Config::preset("stories260k").unwrap();
        assert_eq!(28 + 4 * (c.n_params() + c.seq_len * c.head_dim()), 1_056_540);
        // Stories110M is the "109.5 M params" model of DESIGN.md (shared classifier).
        let c = Config::preset("stories110m").unwrap();
        assert_eq!(c.n_params(), 109_529_856);
        let biased = Config { qkv_bias: true, shared_classifier: false, ..Config::preset("tiny").unwrap() };
        let plain = Config::preset("tiny").unwrap();
        assert_eq!(biased.n_params() - plain.n_params(), 4 * (64 + 2 * 32) + 512 * 64);
    }

    #[test]
    fn validate_names_the_field() {
        let good = Config::preset("tiny").unwrap();
        let cases: Vec<(Config, &str)> = vec![
            (Config { dim: 0, ..good.clone() }, "dim is 0"),
            (Config { n_layers: 100_000, ..good.clone() }, "n_layers is 100000"),
            (Config { vocab_size: 0, ..good.clone() }, "vocab_size is 0"),
            (Config { dim: 66, ..good.clone() }, "dim 66 is not divisible by n_heads 4"),
            (Config { n_kv_heads: 3, ..good.clone() }, "n_heads 4 is not divisible by n_kv_heads 3"),
            (Config { dim: 20, n_heads: 4, n_kv_heads: 4, ..good.clone() }, "head_dim"),
            (Config { norm_eps: -1.0, ..good.clone() }, "norm_eps is -1"),
            (Config { rope_theta: f32::NAN, ..good.clone() }, "rope_theta is NaN"),
        ];
        for (config, expected) in cases {
            let e = config.validate().unwrap_err();
            assert!(e.message.contains(expected), "{:?} should mention {expected:?}", e.message);
        }
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let c = Config { qkv_bias: true, ..Config::preset("stories15m").unwrap() };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
        let short =
            r#"{"dim":64,"hidden_dim":172,"n_layers":5,"n_heads":8,"n_kv_heads":4,"vocab_size":512,"seq_len":512}"#;
        assert_eq!(serde_json::from_str::<Config>(short).unwrap(), Config::preset("stories260k").unwrap());
    }
}
