//! Hugging Face checkpoints: a folder with `config.json` and `model.safetensors` (or
//! shards listed in `model.safetensors.index.json`), read and written.
//!
//! Two architectures share this layout and both map onto [`Params`]:
//!
//! | `architectures[0]` | what differs |
//! |---|---|
//! | `LlamaForCausalLM` | no biases; ε, θ and tying from config.json |
//! | `Qwen2ForCausalLM` | biases on the Q, K and V projections (Qwen2.5: θ = 1e6, ε = 1e-6, tied) |
//!
//! Tensor names (`L` = layer):
//!
//! ```text
//! model.embed_tokens.weight                      token_embedding  [vocab, dim]
//! model.layers.L.input_layernorm.weight          rms_att          [dim]
//! model.layers.L.self_attn.q_proj.weight|bias    wq | bq          [dim, dim] | [dim]        (RoPE-permuted)
//! model.layers.L.self_attn.k_proj.weight|bias    wk | bk          [kv_dim, dim] | [kv_dim]  (RoPE-permuted)
//! model.layers.L.self_attn.v_proj.weight|bias    wv | bv          [kv_dim, dim] | [kv_dim]
//! model.layers.L.self_attn.o_proj.weight         wo               [dim, dim]
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
//! `bq`, `bk`) inside each head turns one convention into the other, and the attention
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

use crate::config::Config;
use crate::error::{err, Error, Result};
use crate::params::{Params, TensorKind, TensorSpec};

/// The `architectures` this module reads, as config.json spells them.
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "Qwen2ForCausalLM"];

/// File names inside a Hugging Face model folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// A model family this module maps onto [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    /// `LlamaForCausalLM` or `Qwen2ForCausalLM`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => SUPPORTED_ARCHITECTURES[0],
            Architecture::Qwen2 => SUPPORTED_ARCHITECTURES[1],
        }
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    fn from_name(name: &str) -> Option<Architecture> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The architecture that can hold `config`: Qwen2 when it has QKV biases.
    pub fn for_config(config: &Config) -> Architecture {
        if config.qkv_bias {
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
/// (rope scaling, sliding windows, a different activation, biases Llama cannot hold)
/// is [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) and says what is supported.
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
    config.rope_theta = rope_theta(obj, float_or("rope_theta", 10000.0)?)?;
    config.shared_classifier = bool_or("tie_word_embeddings", false)?;
    config.qkv_bias = architecture == Architecture::Qwen2;

    if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(err!(Unsupported, "field `hidden_act` is {act:?}; only \"silu\" (SwiGLU) is supported"));
        }
    }
    if obj.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        return Err(err!(Unsupported, "field `rope_scaling` is set; only plain RoPE (rope_scaling null) is supported"));
    }
    if bool_or("use_sliding_window", false)? {
        return Err(err!(Unsupported, "field `use_sliding_window` is true; only full attention is supported"));
    }
    for field in ["attention_bias", "mlp_bias"] {
        if architecture == Architecture::Llama && bool_or(field, false)? {
            return Err(err!(
                Unsupported,
                "field `{field}` is true; LlamaForCausalLM is supported without biases \
                 (Qwen2ForCausalLM's Q/K/V biases are supported)"
            ));
        }
    }
    if let Some(v) = obj.get("head_dim").filter(|v| !v.is_null()) {
        let head_dim = v.as_u64().ok_or_else(|| err!(Format, "field `head_dim` is {v}; it must be a whole number"))?;
        if n_heads == 0 || head_dim as usize * n_heads != dim {
            return Err(err!(
                Unsupported,
                "field `head_dim` is {head_dim}, but hidden_size {dim} / num_attention_heads {n_heads} differs; \
                 only head_dim = hidden_size / num_attention_heads is supported"
            ));
        }
    }
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

/// The config.json of `hf` (`LlamaForCausalLM` or `Qwen2ForCausalLM`), with the fields
/// transformers reads.
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
        "rope_scaling": null,
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
        Architecture::Qwen2 => {
            map.insert("use_sliding_window".into(), json!(false));
            map.insert("sliding_window".into(), json!(c.seq_len));
            map.insert("max_window_layers".into(), json!(c.n_layers));
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

/// RoPE's θ. transformers 5 writes `rope_parameters: {"rope_type": "default",
/// "rope_theta": θ}` where earlier versions wrote `rope_theta` (and `rope_scaling`) at the
/// top level; `top_level` is the latter, or its default.
fn rope_theta(obj: &serde_json::Map<String, Value>, top_level: f32) -> Result<f32> {
    let Some(params) = obj.get("rope_parameters").filter(|v| !v.is_null()) else { return Ok(top_level) };
    let params =
        params.as_object().ok_or_else(|| err!(Format, "field `rope_parameters` is {params}; it must be an object"))?;
    match params.get("rope_type").filter(|v| !v.is_null()) {
        None => {}
        Some(Value::String(kind)) if kind == "default" => {}
        Some(kind) => {
            return Err(err!(
                Unsupported,
                "field `rope_parameters.rope_type` is {kind}; only plain RoPE (\"default\") is supported"
            ))
        }
    }
    match params.get("rope_theta").filter(|v| !v.is_null()) {
        None => Ok(top_level),
        Some(v) => v
            .as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| err!(Format, "field `rope_parameters.rope_theta` is {v}; it must be a number")),
    }
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
             num_attention_heads {}, num_key_value_heads {}, vocab_size {})",
            view.shape(),
            config.dim,
            config.hidden_dim,
            config.n_heads,
            config.n_kv_heads,
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
        assert!(e.message.contains("rope_scaling"), "{e}");
        let e = with(r#""hidden_act":"gelu""#);
        assert!(e.message.contains("hidden_act") && e.message.contains("silu"), "{e}");
        let e = with(r#""attention_bias":true"#);
        assert!(e.message.contains("attention_bias"), "{e}");
        let e = with(r#""head_dim":16"#);
        assert!(e.message.contains("head_dim"), "{e}");
        // transformers 5 keeps θ in `rope_parameters` (which wins over a top-level one).
        let ok = |extra: &str| parse_config(&base.replacen('{', &format!("{{{extra},"), 1)).unwrap().config;
        assert_eq!(ok(r#""rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}"#).rope_theta, 1e6);
        assert_eq!(ok(r#""rope_theta":500000.0"#).rope_theta, 5e5);
        assert_eq!(ok(r#""rope_theta":10000.0,"rope_parameters":{"rope_theta":2e6}"#).rope_theta, 2e6);
        assert_eq!(ok(r#""rope_parameters":null"#).rope_theta, 10000.0);
        let e = with(r#""rope_parameters":{"rope_type":"yarn","rope_theta":1e6,"factor":4.0}"#);
        assert!(e.message.contains("rope_parameters.rope_type") && e.message.contains("yarn"), "{e}");
        let e = with(r#""rope_parameters":{"rope_theta":"big"}"#);
        assert!(e.message.contains("rope_parameters.rope_theta"), "{e}");
        let e = parse_config(&base.replace("LlamaForCausalLM", "MistralForCausalLM")).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Unsupported);
        assert!(e.message.contains("MistralForCausalLM") && e.message.contains("LlamaForCausalLM, Qwen2ForCausalLM"));
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
    }
}
