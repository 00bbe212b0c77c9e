//! Hugging Face checkpoints: a folder with `config.json` and `model.safetensors` (or
//! shards listed in `model.safetensors.index.json`), read and written.
//!
//! Four architectures share this layout and all map onto [`Params`]:
//!
//! | `architectures[0]` | what differs |
//! |---|---|
//! | `LlamaForCausalLM` | no biases; ε, θ, tying, `head_dim` and `rope_scaling` (type `llama3`: Llama 3.1/3.2, SmolLM3) from config.json |
//! | `MistralForCausalLM` | as Llama, without a sliding window (`sliding_window` null or ≥ the context) |
//! | `Qwen2ForCausalLM` | biases on the Q, K and V projections (Qwen2.5: θ = 1e6, ε = 1e-6, tied) |
//! | `Qwen3ForCausalLM` | no biases; per-head RMSNorm of Q and K before RoPE (`q_norm`, `k_norm`); `head_dim` apart from `hidden_size / num_attention_heads` (default 128) |
//!
//! Tensor names (`L` = layer):
//!
//! ```text
//! model.embed_tokens.weight                      token_embedding  [vocab, dim]
//! model.layers.L.input_layernorm.weight          rms_att          [dim]
//! model.layers.L.self_attn.q_proj.weight|bias    wq | bq          [q_dim, dim] | [q_dim]    (RoPE-permuted)
//! model.layers.L.self_attn.k_proj.weight|bias    wk | bk          [kv_dim, dim] | [kv_dim]  (RoPE-permuted)
//! model.layers.L.self_attn.v_proj.weight|bias    wv | bv          [kv_dim, dim] | [kv_dim]
//! model.layers.L.self_attn.q_norm.weight         q_norm           [head_dim]                (RoPE-permuted; Qwen3)
//! model.layers.L.self_attn.k_norm.weight         k_norm           [head_dim]                (RoPE-permuted; Qwen3)
//! model.layers.L.self_attn.o_proj.weight         wo               [dim, q_dim]
//! model.layers.L.post_attention_layernorm.weight rms_ffn          [dim]
//! model.layers.L.mlp.gate_proj.weight            w1               [hidden, dim]
//! model.layers.L.mlp.down_proj.weight            w2               [dim, hidden]
//! model.layers.L.mlp.up_proj.weight              w3               [hidden, dim]
//! model.norm.weight                              rms_final        [dim]
//! lm_head.weight                                 wcls             [vocab, dim]  (absent when tied)
//! ```
//!
//! ## The RoPE permutation
//! llama2.c (and Meta's original Llama code, and [`reference`](crate::reference)) rotate
//! *interleaved* pairs `(x[2i], x[2i+1])` of each head; Hugging Face's Llama and Qwen2
//! rotate the two *halves* `(x[i], x[i + head_dim/2])`. Both use frequency
//! `θ^(-2i/head_dim)` for pair `i`. Reordering the output rows of `Wq` and `Wk` (and of
//! `bq`, `bk`, and the elements of the QK-norm gains) inside each head turns one convention into the other, and the attention
//! scores `q·k` do not change because queries and keys are reordered alike. This is the
//! `permute` of transformers' `convert_llama_weights_to_hf.py`:
//!
//! ```text
//! HF row  h·head_dim + j·head_dim/2 + i   ⟵   llama2.c row  h·head_dim + 2i + j     (j ∈ {0, 1})
//! ```
//!
//! [`Params`] always hold the llama2.c convention: [`read_model`] permutes HF → llama2.c,
//! [`write_model`] llama2.c → HF. Both are exact reorderings, so a round trip is
//! bit-exact in fp32.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
/// The tensor element types of safetensors files (F32, F16 and BF16 are read and written).
pub use safetensors::Dtype;
use safetensors::SafeTensors;
use serde_json::{json, Value};

use crate::config::{Config, RopeScaling};
use crate::error::{err, Error, Result};
use crate::params::{Params, TensorKind, TensorSpec};

/// The `architectures` this module reads, as config.json spells them.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"];

/// Qwen3's head width when config.json leaves `head_dim` out (transformers `Qwen3Config`).
const QWEN3_DEFAULT_HEAD_DIM: usize = 128;

/// File names inside a Hugging Face model folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// A model family this module maps onto [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => SUPPORTED_ARCHITECTURES[0],
            Architecture::Mistral => SUPPORTED_ARCHITECTURES[1],
            Architecture::Qwen2 => SUPPORTED_ARCHITECTURES[2],
            Architecture::Qwen3 => SUPPORTED_ARCHITECTURES[3],
        }
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    fn from_name(name: &str) -> Option<Architecture> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            _ => None,
        }
    }

    /// The architecture that can hold `config`: Qwen3 when it has QK-norm, Qwen2 when it
    /// has QKV biases, else Llama. (A model with both is refused by [`write_model`].)
    pub fn for_config(config: &Config) -> Architecture {
        if config.qk_norm {
            Architecture::Qwen3
        } else if config.qkv_bias {
            Architecture::Qwen2
        } else {
            Architecture::Llama
        }
    }
}

/// What a config.json says: the model's shape plus the token ids generation needs.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub architecture: Architecture,
    /// `seq_len` is `max_position_embeddings` (Qwen2.5: 32768; callers may lower it).
    pub config: Config,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these (config.json allows one id or a list).
    pub eos_token_ids: Vec<u32>,
}

/// A model read from a Hugging Face folder, in llama2.c's RoPE convention.
#[derive(Clone, Debug)]
pub struct HfModel {
    pub params: Params,
    pub hf_config: HfConfig,
    /// The dtype the weights were stored in (they are fp32 in `params`).
    pub dtype: Dtype,
}

// ---------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------

/// Reads and checks a config.json.
pub fn read_config(path: impl AsRef<Path>) -> Result<HfConfig> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read", e))?;
    parse_config(&text).map_err(|e| e.in_file(path))
}

/// Parses a config.json. Errors name the field; an unsupported architecture or feature
/// (a RoPE scaling other than `llama3`, sliding windows, a different activation, biases
/// the architecture does not hold here) is
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) and says what is supported.
pub fn parse_config(text: &str) -> Result<HfConfig> {
    let value: Value = serde_json::from_str(text).map_err(|e| err!(Format, "not valid JSON: {e}"))?;
    let obj = value.as_object().ok_or_else(|| err!(Format, "config.json must be a JSON object"))?;
    let supported = SUPPORTED_ARCHITECTURES.join(", ");
    let arch_name = obj
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .ok_or_else(|| err!(Format, "field `architectures` is missing; supported architectures: {supported}"))?;
    let architecture = Architecture::from_name(arch_name).ok_or_else(|| {
        err!(Unsupported, "architecture {arch_name} is not supported; supported architectures: {supported}")
    })?;

    let uint = |field: &str| -> Result<usize> {
        let v = obj.get(field).ok_or_else(|| err!(Format, "field `{field}` is missing"))?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| err!(Format, "field `{field}` is {v}; it must be a whole number"))
    };
    let float_or = |field: &str, default: f32| -> Result<f32> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => {
                v.as_f64().map(|f| f as f32).ok_or_else(|| err!(Format, "field `{field}` is {v}; it must be a number"))
            }
        }
    };
    let bool_or = |field: &str, default: bool| -> Result<bool> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| err!(Format, "field `{field}` is {v}; it must be true or false")),
        }
    };

    let dim = uint("hidden_size")?;
    let n_heads = uint("num_attention_heads")?;
    let n_kv_heads = if obj.contains_key("num_key_value_heads") { uint("num_key_value_heads")? } else { n_heads };
    let mut config = Config::new(
        dim,
        uint("intermediate_size")?,
        uint("num_hidden_layers")?,
        n_heads,
        n_kv_heads,
        uint("vocab_size")?,
        uint("max_position_embeddings")?,
    );
    // transformers' defaults when a field is absent (LlamaConfig / Qwen2Config).
    config.norm_eps = float_or("rms_norm_eps", 1e-6)?;
    let (theta, scaling) = rope(obj, float_or("rope_theta", 10000.0)?)?;
    config.rope_theta = theta;
    config.rope_scaling = scaling;
    config.shared_classifier = bool_or("tie_word_embeddings", false)?;
    config.qkv_bias = architecture == Architecture::Qwen2;
    config.qk_norm = architecture == Architecture::Qwen3;

    if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(err!(Unsupported, "field `hidden_act` is {act:?}; only \"silu\" (SwiGLU) is supported"));
        }
    }
    if bool_or("use_sliding_window", false)? {
        return Err(err!(Unsupported, "field `use_sliding_window` is true; only full attention is supported"));
    }
    if architecture == Architecture::Mistral {
        if let Some(v) = obj.get("sliding_window").filter(|v| !v.is_null()) {
            let window =
                v.as_u64().ok_or_else(|| err!(Format, "field `sliding_window` is {v}; it must be a whole number"))?;
            if (window as usize) < config.seq_len {
                return Err(err!(
                    Unsupported,
                    "field `sliding_window` is {window}, below max_position_embeddings {}; only full attention \
                     (sliding_window null or at least the context) is supported",
                    config.seq_len
                ));
            }
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        if architecture != Architecture::Qwen2 && bool_or(field, false)? {
            return Err(err!(
                Unsupported,
                "field `{field}` is true; {} is supported without biases \
                 (Qwen2ForCausalLM's Q/K/V biases are supported)",
                architecture.name()
            ));
        }
    }
    let head_dim = match obj.get("head_dim").filter(|v| !v.is_null()) {
        Some(v) => {
            Some(v.as_u64().ok_or_else(|| err!(Format, "field `head_dim` is {v}; it must be a whole number"))? as usize)
        }
        None if architecture == Architecture::Qwen3 => Some(QWEN3_DEFAULT_HEAD_DIM),
        None => None,
    };
    // Kept apart only when it differs, so a plain model stays llama2.c-compatible.
    config.explicit_head_dim = head_dim.filter(|&h| n_heads == 0 || h * n_heads != dim);
    config.validate().map_err(|e| err!(Format, "{} (in the fields of config.json)", e.message))?;

    let token_id = |v: &Value| v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32);
    let bos_token_id = obj.get("bos_token_id").and_then(token_id);
    let eos_token_ids = match obj.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(token_id).collect(),
        Some(v) => token_id(v).into_iter().collect(),
        None => Vec::new(),
    };
    Ok(HfConfig { architecture, config, bos_token_id, eos_token_ids })
}

/// `x` as a JSON number printed the shortest way that reads back as the same f32
/// (`1e-5`, not `9.99999974737875e-6`), so transformers sees the intended constant.
fn f32_json(x: f32) -> Value {
    let shortest: f64 = x.to_string().parse().expect("an f32 prints as a valid f64");
    json!(shortest)
}

/// The config.json of `hf`, with the fields transformers reads.
pub fn config_json(hf: &HfConfig, dtype: Dtype) -> Value {
    let c = &hf.config;
    let mut obj = json!({
        "architectures": [hf.architecture.name()],
        "model_type": hf.architecture.model_type(),
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim(),
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": f32_json(c.norm_eps),
        "rope_theta": f32_json(c.rope_theta),
        "rope_scaling": c.rope_scaling.map(|s| rope_scaling_json(&s)),
        "tie_word_embeddings": c.shared_classifier,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": dtype_name(dtype),
    });
    let map = obj.as_object_mut().expect("a JSON object");
    match hf.architecture {
        Architecture::Llama => {
            map.insert("attention_bias".into(), json!(false));
            map.insert("mlp_bias".into(), json!(false));
            map.insert("pretraining_tp".into(), json!(1));
        }
        Architecture::Mistral => {
            map.insert("sliding_window".into(), Value::Null);
        }
        Architecture::Qwen2 | Architecture::Qwen3 => {
            map.insert("use_sliding_window".into(), json!(false));
            map.insert("sliding_window".into(), Value::Null);
            map.insert("max_window_layers".into(), json!(c.n_layers));
            if hf.architecture == Architecture::Qwen3 {
                map.insert("attention_bias".into(), json!(false));
            }
        }
    }
    if let Some(bos) = hf.bos_token_id {
        map.insert("bos_token_id".into(), json!(bos));
    }
    match hf.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            map.insert("eos_token_id".into(), json!(one));
        }
        many => {
            map.insert("eos_token_id".into(), json!(many));
        }
    }
    obj
}

/// transformers' `rope_scaling` object for a scaling.
fn rope_scaling_json(scaling: &RopeScaling) -> Value {
    match *scaling {
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
            "rope_type": "llama3",
            "factor": f32_json(factor),
            "low_freq_factor": f32_json(low_freq_factor),
            "high_freq_factor": f32_json(high_freq_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

/// RoPE's θ and scaling. transformers 5 writes `rope_parameters: {"rope_type": …,
/// "rope_theta": θ, …}` where earlier versions wrote `rope_theta` and `rope_scaling` at
/// the top level; `top_level_theta` is the former top-level θ, or its default.
fn rope(obj: &serde_json::Map<String, Value>, top_level_theta: f32) -> Result<(f32, Option<RopeScaling>)> {
    let (field, params) = match obj.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(p) => ("rope_parameters", p),
        None => match obj.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(p) => ("rope_scaling", p),
            None => return Ok((top_level_theta, None)),
        },
    };
    let params = params.as_object().ok_or_else(|| err!(Format, "field `{field}` is {params}; it must be an object"))?;
    let number = |key: &str| -> Result<Option<f64>> {
        match params.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| err!(Format, "field `{field}.{key}` is {v}; it must be a number"))
            }
        }
    };
    let theta = number("rope_theta")?.map_or(top_level_theta, |t| t as f32);
    // Older configs spell the kind `type`.
    let kind = params.get("rope_type").or_else(|| params.get("type")).filter(|v| !v.is_null());
    let scaling = match kind {
        None => None,
        Some(Value::String(kind)) if kind == "default" => None,
        Some(Value::String(kind)) if kind == "llama3" => {
            let need = |key: &str| -> Result<f64> {
                number(key)?.ok_or_else(|| err!(Format, "field `{field}.{key}` is missing (rope type llama3 needs it)"))
            };
            Some(RopeScaling::Llama3 {
                factor: need("factor")? as f32,
                low_freq_factor: need("low_freq_factor")? as f32,
                high_freq_factor: need("high_freq_factor")? as f32,
                original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
            })
        }
        Some(kind) => {
            return Err(err!(
                Unsupported,
                "field `{field}.rope_type` is {kind}; supported: plain RoPE (\"default\") and \"llama3\""
            ))
        }
    };
    Ok((theta, scaling))
}

/// transformers' name of a dtype (`torch_dtype`).
fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

// ---------------------------------------------------------------------------------------
// Tensor names and the RoPE permutation
// ---------------------------------------------------------------------------------------

/// The Hugging Face name of one of our tensors (see the module docs).
pub fn hf_name(spec: &TensorSpec) -> String {
    let layer = |suffix: &str| format!("model.layers.{}.{suffix}", spec.layer.expect("a per-layer tensor"));
    match spec.kind {
        TensorKind::TokenEmbedding => "model.embed_tokens.weight".into(),
        TensorKind::RmsAtt => layer("input_layernorm.weight"),
        TensorKind::Wq => layer("self_attn.q_proj.weight"),
        TensorKind::Wk => layer("self_attn.k_proj.weight"),
        TensorKind::Wv => layer("self_attn.v_proj.weight"),
        TensorKind::Bq => layer("self_attn.q_proj.bias"),
        TensorKind::Bk => layer("self_attn.k_proj.bias"),
        TensorKind::Bv => layer("self_attn.v_proj.bias"),
        TensorKind::QNorm => layer("self_attn.q_norm.weight"),
        TensorKind::KNorm => layer("self_attn.k_norm.weight"),
        TensorKind::Wo => layer("self_attn.o_proj.weight"),
        TensorKind::RmsFfn => layer("post_attention_layernorm.weight"),
        TensorKind::W1 => layer("mlp.gate_proj.weight"),
        TensorKind::W2 => layer("mlp.down_proj.weight"),
        TensorKind::W3 => layer("mlp.up_proj.weight"),
        TensorKind::RmsFinal => "model.norm.weight".into(),
        TensorKind::Wcls => "lm_head.weight".into(),
    }
}

/// How many RoPE heads a tensor's rows form, for the tensors whose rows are permuted.
fn rope_heads(kind: TensorKind, config: &Config) -> Option<usize> {
    match kind {
        TensorKind::Wq | TensorKind::Bq => Some(config.n_heads),
        TensorKind::Wk | TensorKind::Bk => Some(config.n_kv_heads),
        // One head's gain, applied to every head.
        TensorKind::QNorm | TensorKind::KNorm => Some(1),
        _ => None,
    }
}

/// Direction of [`permute_rows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    /// llama2.c's interleaved pairs → Hugging Face's half-split pairs.
    InterleavedToHalves,
    /// Hugging Face's half-split pairs → llama2.c's interleaved pairs.
    HalvesToInterleaved,
}

/// Reorders the rows of `w: [n_heads·head_dim, cols]` within each head between the two
/// RoPE conventions (see the module docs). A bias is the case `cols = 1`.
pub fn permute_rows(w: &[f32], n_heads: usize, cols: usize, direction: Rope) -> Vec<f32> {
    let rows = w.len() / cols;
    assert_eq!(rows * cols, w.len(), "permute_rows: {} values are not whole rows of {cols}", w.len());
    assert!(rows.is_multiple_of(2 * n_heads), "permute_rows: {rows} rows are not {n_heads} heads of even width");
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let interleaved = h * head_dim + 2 * i + j;
                let halves = h * head_dim + j * half + i;
                let (src, dst) = match direction {
                    Rope::InterleavedToHalves => (interleaved, halves),
                    Rope::HalvesToInterleaved => (halves, interleaved),
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Every tensor of `params` under its Hugging Face name, in HF's RoPE convention:
/// `(name, shape, values)` in [`Params`] order.
pub fn to_hf_tensors(params: &Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let config = params.config();
    params
        .layout()
        .specs()
        .iter()
        .map(|spec| {
            let values = params.get(spec);
            let values = match rope_heads(spec.kind, config) {
                Some(heads) => {
                    let cols = if spec.shape.len() == 2 { spec.shape[1] } else { 1 };
                    permute_rows(values, heads, cols, Rope::InterleavedToHalves)
                }
                None => values.to_vec(),
            };
            (hf_name(spec), spec.shape.clone(), values)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// One tensor ready for the safetensors writer.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `values` as little-endian bytes of `dtype` (F32, F16 or BF16; rounding to nearest even).
fn encode(values: &[f32], dtype: Dtype) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        other => return Err(err!(Unsupported, "cannot write dtype {other:?}; supported: F32, F16, BF16")),
    })
}

/// Writes named tensors as one safetensors file.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: Dtype,
) -> Result<()> {
    let path = path.as_ref();
    let encoded: Vec<(String, Encoded)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            Ok((name.clone(), Encoded { dtype, shape: shape.clone(), bytes: encode(values, dtype)? }))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(encoded.iter().map(|(n, e)| (n.as_str(), e)), Some(metadata), path)
        .map_err(|e| err!(Io, "cannot write safetensors: {e}").in_file(path))
}

/// Writes `params` as a Hugging Face model folder: `model.safetensors` (in `dtype`) and
/// `config.json` (`LlamaForCausalLM`, or `Qwen2ForCausalLM` for a model with QKV
/// biases). Tokenizer files are the caller's (see [`crate::tokenizers`]).
pub fn write_model(
    params: &Params,
    dir: impl AsRef<Path>,
    dtype: Dtype,
    bos_token_id: Option<u32>,
    eos_token_ids: &[u32],
) -> Result<()> {
    let dir = dir.as_ref();
    if params.config().qk_norm && params.config().qkv_bias {
        return Err(err!(
            Unsupported,
            "a model with both QK-norm and QKV biases has no Hugging Face architecture here \
             (Qwen3ForCausalLM has no biases, Qwen2ForCausalLM no QK-norm)"
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create the folder", e))?;
    let hf = HfConfig {
        architecture: Architecture::for_config(params.config()),
        config: params.config().clone(),
        bos_token_id,
        eos_token_ids: eos_token_ids.to_vec(),
    };
    write_safetensors(dir.join(WEIGHTS_FILE), &to_hf_tensors(params), dtype)?;
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config_json(&hf, dtype)).expect("JSON values serialize");
    std::fs::write(&config_path, text + "\n").map_err(|e| Error::io(&config_path, "cannot write", e))
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// The weight files of a model folder: `model.safetensors`, or the shards an index names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if !index.is_file() {
        return Err(err!(Io, "no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}) in this folder").in_file(dir));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, "cannot read", e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| err!(Format, "not valid JSON: {e}").in_file(&index))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err!(Format, "field `weight_map` is missing or not an object").in_file(&index))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Decodes a tensor's bytes (F32, F16 or BF16, checked by the caller) to f32.
pub fn decode(view: &safetensors::tensor::TensorView<'_>, dst: &mut [f32]) {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => {
            dst.iter_mut().zip(data.chunks_exact(4)).for_each(|(d, b)| *d = f32::from_le_bytes(b.try_into().unwrap()))
        }
        Dtype::F16 => dst
            .iter_mut()
            .zip(data.chunks_exact(2))
            .for_each(|(d, b)| *d = f16::from_le_bytes(b.try_into().unwrap()).to_f32()),
        Dtype::BF16 => dst
            .iter_mut()
            .zip(data.chunks_exact(2))
            .for_each(|(d, b)| *d = bf16::from_le_bytes(b.try_into().unwrap()).to_f32()),
        other => unreachable!("dtype {other:?} is refused before decoding"),
    }
}

/// Reads a Hugging Face model folder (`config.json` + safetensors) into [`Params`] in
/// llama2.c's RoPE convention. Every tensor the config implies must be present with
/// its exact shape and a dtype of F32, F16 or BF16; a tensor the layout has no place
/// for is an error too (it would be silently ignored otherwise), except `lm_head.weight`
/// of a tied model when it equals the embedding, and RoPE `inv_freq` buffers.
pub fn read_model(dir: impl AsRef<Path>) -> Result<HfModel> {
    let dir = dir.as_ref();
    let hf_config = read_config(dir.join(CONFIG_FILE))?;
    let config = hf_config.config.clone();
    let files = weight_files(dir)?;
    let buffers: Vec<Vec<u8>> =
        files.iter().map(|f| std::fs::read(f).map_err(|e| Error::io(f, "cannot read", e))).collect::<Result<_>>()?;
    let parsed: Vec<SafeTensors<'_>> = buffers
        .iter()
        .zip(&files)
        .map(|(b, f)| {
            SafeTensors::deserialize(b).map_err(|e| err!(Format, "not a valid safetensors file: {e}").in_file(f))
        })
        .collect::<Result<_>>()?;
    // Tensor name → (file index).
    let mut where_is: BTreeMap<String, usize> = BTreeMap::new();
    for (i, st) in parsed.iter().enumerate() {
        for name in st.names() {
            where_is.insert(name.to_string(), i);
        }
    }

    let mut params = Params::zeros(&config)?;
    let mut dtype = None;
    let specs = params.layout().specs().to_vec();
    for spec in &specs {
        let name = hf_name(spec);
        let Some(&file) = where_is.get(&name) else {
            return Err(missing_tensor(&name, &spec.shape, &where_is).in_file(&files[0]));
        };
        let view = parsed[file].tensor(&name).expect("listed by names()");
        check_view(&name, &view, &spec.shape, &config).map_err(|e| e.in_file(&files[file]))?;
        dtype.get_or_insert(view.dtype());
        let values = params.get_mut(spec);
        decode(&view, values);
        if let Some(heads) = rope_heads(spec.kind, &config) {
            let cols = if spec.shape.len() == 2 { spec.shape[1] } else { 1 };
            let permuted = permute_rows(values, heads, cols, Rope::HalvesToInterleaved);
            values.copy_from_slice(&permuted);
        }
        where_is.remove(&name);
    }

    // What is left has no place in the model.
    for (name, &file) in &where_is {
        if name.ends_with("rotary_emb.inv_freq") {
            continue; // a RoPE table some exports carry; recomputed from rope_theta.
        }
        if name == "lm_head.weight" && config.shared_classifier {
            let view = parsed[file].tensor(name).expect("listed by names()");
            let shape = [config.vocab_size, config.dim];
            check_view(name, &view, &shape, &config).map_err(|e| e.in_file(&files[file]))?;
            let mut head = vec![0.0; config.vocab_size * config.dim];
            decode(&view, &mut head);
            if head.as_slice() != params.token_embedding() {
                return Err(err!(
                    Mismatch,
                    "config.json says tie_word_embeddings, but lm_head.weight differs from model.embed_tokens.weight"
                )
                .in_file(&files[file]));
            }
            continue;
        }
        return Err(err!(
            Unsupported,
            "tensor {name} has no place in a {} model of this config (is it another architecture? supported: {})",
            hf_config.architecture.name(),
            SUPPORTED_ARCHITECTURES.join(", ")
        )
        .in_file(&files[file]));
    }
    Ok(HfModel { params, hf_config, dtype: dtype.unwrap_or(Dtype::F32) })
}

fn missing_tensor(name: &str, shape: &[usize], present: &BTreeMap<String, usize>) -> Error {
    let hint = if present.is_empty() {
        "the file holds no tensors".to_string()
    } else {
        let some: Vec<&str> = present.keys().take(3).map(String::as_str).collect();
        format!("the file holds {} tensors, e.g. {}", present.len(), some.join(", "))
    };
    err!(Format, "tensor {name} (shape {shape:?}) is missing; {hint}")
}

/// Checks a tensor's dtype and shape against what config.json implies.
fn check_view(name: &str, view: &safetensors::tensor::TensorView<'_>, want: &[usize], config: &Config) -> Result<()> {
    if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(err!(
            Unsupported,
            "tensor {name} has dtype {:?} (shape {:?}); supported dtypes are F32, F16 and BF16",
            view.dtype(),
            view.shape()
        ));
    }
    if view.shape() != want {
        return Err(err!(
            Mismatch,
            "tensor {name} has shape {:?}, but config.json implies {want:?} (hidden_size {}, intermediate_size {}, \
             num_attention_heads {}, num_key_value_heads {}, head_dim {}, vocab_size {})",
            view.shape(),
            config.dim,
            config.hidden_dim,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim(),
            config.vocab_size
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_the_transformers_formula_and_inverts() {
        // transformers: w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)
        let (heads, head_dim, cols) = (2, 6, 3);
        let w: Vec<f32> = (0..heads * head_dim * cols).map(|i| i as f32).collect();
        let hf = permute_rows(&w, heads, cols, Rope::InterleavedToHalves);
        let half = head_dim / 2;
        for h in 0..heads {
            for a in 0..half {
                for b in 0..2 {
                    // view index (h, a, b) → after transpose (h, b, a)
                    let src_row = h * head_dim + a * 2 + b;
                    let dst_row = h * head_dim + b * half + a;
                    assert_eq!(hf[dst_row * cols..(dst_row + 1) * cols], w[src_row * cols..(src_row + 1) * cols]);
                }
            }
        }
        assert_eq!(permute_rows(&hf, heads, cols, Rope::HalvesToInterleaved), w);
    }

    #[test]
    fn config_defaults_and_unsupported_fields() {
        let base = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":172,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":4,"vocab_size":512,
            "max_position_embeddings":128,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;
        let hf = parse_config(base).unwrap();
        assert_eq!(hf.architecture, Architecture::Llama);
        assert_eq!(hf.config, Config { seq_len: 128, n_layers: 2, ..Config::preset("stories260k").unwrap() });
        let with = |extra: &str| parse_config(&base.replacen('{', &format!("{{{extra},"), 1)).unwrap_err();
        let e = with(r#""rope_scaling":{"type":"linear","factor":2.0}"#);
        assert!(e.message.contains("rope_scaling.rope_type") && e.message.contains("linear"), "{e}");
        let e = with(r#""rope_scaling":{"rope_type":"llama3","factor":8.0}"#);
        assert!(e.message.contains("rope_scaling.low_freq_factor` is missing"), "{e}");
        let e = with(r#""hidden_act":"gelu""#);
        assert!(e.message.contains("hidden_act") && e.message.contains("silu"), "{e}");
        let e = with(r#""attention_bias":true"#);
        assert!(e.message.contains("attention_bias"), "{e}");
        // A head width apart from hidden_size / heads is kept; an equal one is not recorded.
        let ok = |extra: &str| parse_config(&base.replacen('{', &format!("{{{extra},"), 1)).unwrap().config;
        assert_eq!(ok(r#""head_dim":16"#).explicit_head_dim, Some(16));
        assert_eq!(ok(r#""head_dim":16"#).q_dim(), 128);
        assert_eq!(ok(r#""head_dim":8"#).explicit_head_dim, None);
        let e = with(r#""head_dim":7"#);
        assert!(e.message.contains("head_dim is 7") && e.message.contains("even"), "{e}");
        let scaled = ok(r#""rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192},"rope_theta":500000.0"#);
        assert_eq!(
            scaled.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert_eq!(scaled.rope_theta, 5e5);
        // transformers 5 keeps θ in `rope_parameters` (which wins over a top-level one).
        assert_eq!(ok(r#""rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}"#).rope_theta, 1e6);
        assert_eq!(ok(r#""rope_theta":500000.0"#).rope_theta, 5e5);
        assert_eq!(ok(r#""rope_theta":10000.0,"rope_parameters":{"rope_theta":2e6}"#).rope_theta, 2e6);
        assert_eq!(ok(r#""rope_parameters":null"#).rope_theta, 10000.0);
        let e = with(r#""rope_parameters":{"rope_type":"yarn","rope_theta":1e6,"factor":4.0}"#);
        assert!(e.message.contains("rope_parameters.rope_type") && e.message.contains("yarn"), "{e}");
        let e = with(r#""rope_parameters":{"rope_theta":"big"}"#);
        assert!(e.message.contains("rope_parameters.rope_theta"), "{e}");
        let e = parse_config(&base.replace("LlamaForCausalLM", "GemmaForCausalLM")).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Unsupported);
        assert!(e.message.contains("GemmaForCausalLM") && e.message.contains("LlamaForCausalLM, MistralForCausalLM"));
        // Mistral without a sliding window is Llama; with one shorter than the context it is refused.
        let mistral = base.replace("LlamaForCausalLM", "MistralForCausalLM");
        assert_eq!(parse_config(&mistral).unwrap().architecture, Architecture::Mistral);
        let e = parse_config(&mistral.replacen('{', r#"{"sliding_window":64,"#, 1)).unwrap_err();
        assert!(e.message.contains("sliding_window` is 64"), "{e}");
        assert!(parse_config(&mistral.replacen('{', r#"{"sliding_window":4096,"#, 1)).is_ok());
        // Qwen3: QK-norm, no biases, head_dim 128 unless given.
        let qwen3 = base.replace("LlamaForCausalLM", "Qwen3ForCausalLM");
        let c = parse_config(&qwen3).unwrap().config;
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!((c.head_dim(), c.q_dim()), (128, 1024));
        let e = parse_config(&qwen3.replacen('{', r#"{"attention_bias":true,"#, 1)).unwrap_err();
        assert!(e.message.contains("attention_bias") && e.message.contains("Qwen3ForCausalLM"), "{e}");
        let e = parse_config(&base.replace(r#""num_hidden_layers":2,"#, "")).unwrap_err();
        assert!(e.message.contains("`num_hidden_layers` is missing"), "{e}");
    }

    #[test]
    fn config_json_round_trips_and_prints_short_constants() {
        let config = Config { qkv_bias: true, norm_eps: 1e-6, rope_theta: 1e6, ..Config::preset("tiny").unwrap() };
        let hf = HfConfig { architecture: Architecture::Qwen2, config, bos_token_id: None, eos_token_ids: vec![3, 4] };
        let text = serde_json::to_string(&config_json(&hf, Dtype::BF16)).unwrap();
        assert!(text.contains(r#""rms_norm_eps":1e-6"#) || text.contains(r#""rms_norm_eps":0.000001"#), "{text}");
        assert_eq!(parse_config(&text).unwrap(), hf);
        // Qwen3 (QK-norm, a head width apart) and Llama 3 (RoPE scaling) round-trip too.
        let tiny = Config::preset("tiny").unwrap();
        let qwen3 = Config { qk_norm: true, explicit_head_dim: Some(32), ..tiny.clone() };
        let scaling = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let llama3 = Config { rope_theta: 5e5, rope_scaling: Some(scaling), ..tiny };
        for (architecture, config) in [(Architecture::Qwen3, qwen3), (Architecture::Llama, llama3)] {
            assert_eq!(Architecture::for_config(&config), architecture);
            let hf = HfConfig { architecture, config, bos_token_id: Some(1), eos_token_ids: vec![2] };
            let text = serde_json::to_string(&config_json(&hf, Dtype::F32)).unwrap();
            assert_eq!(parse_config(&text).unwrap(), hf, "{text}");
        }
    }

    #[test]
    fn llama3_rope_scaling_keeps_short_waves_and_stretches_long_ones() {
        // transformers `_compute_llama3_parameters`, worked by hand for θ = 500000,
        // head_dim 64, factor 8, low 1, high 4, original context 8192.
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let config = Config { rope_theta: 5e5, rope_scaling: Some(scaling), ..Config::new(256, 512, 1, 4, 4, 16, 64) };
        let plain = Config { rope_scaling: None, ..config.clone() }.rope_freqs();
        let scaled = config.rope_freqs();
        for (i, (&f, &s)) in plain.iter().zip(&scaled).enumerate() {
            let wavelen = 2.0 * std::f64::consts::PI / f as f64;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(s, f, "pair {i}: a short wave keeps its frequency");
            } else if wavelen > 8192.0 {
                assert!((s as f64 - f as f64 / 8.0).abs() <= 1e-7 * f as f64, "pair {i}: a long wave is divided");
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                let want = (1.0 - smooth) * f as f64 / 8.0 + smooth * f as f64;
                assert!((s as f64 - want).abs() <= 1e-6 * want, "pair {i}: {s} vs {want}");
            }
        }
        // The three regimes all occur at this shape.
        assert!(scaled.iter().zip(&plain).any(|(s, f)| s == f));
        assert!(scaled.iter().zip(&plain).any(|(s, f)| (s * 8.0 - f).abs() < 1e-6 * f));
        assert!(scaled.iter().zip(&plain).any(|(s, f)| s != f && (s * 8.0 - f).abs() > 1e-6 * f));
    }
}
