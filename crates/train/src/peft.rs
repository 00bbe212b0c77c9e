//! PEFT's LoRA adapter folders, read and written: `adapter_config.json` and
//! `adapter_model.safetensors`, as `peft.PeftModel.from_pretrained(base, DIR)` loads
//! them and `PeftModel.save_pretrained(DIR)` writes them.
//!
//! ```text
//! base_model.model.model.layers.{L}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
//! base_model.model.model.layers.{L}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
//! base_model.model.model.layers.{L}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
//! ```
//!
//! anetrain keeps `wq`, `wk` in llama2.c's interleaved RoPE convention and Hugging Face
//! in its half-split one (`llama::hf` permutes the rows of `q_proj`, `k_proj` between
//! them). An adapter's `B` produces rows of the projection's output, so its rows are
//! permuted the same way; `A` reads the unpermuted input and is not.

use std::path::{Path, PathBuf};

use llama::hf::{permute_rows, Dtype, Rope};
use llama::Config;
use serde_json::{json, Value};

use crate::lora::{LoraConfig, LoraParams, LoraTarget};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An error reading or writing an adapter folder, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PeftError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, message: impl Into<String>) -> PeftError {
    PeftError { path: path.to_path_buf(), message: message.into() }
}

/// PEFT's tensor name of `target`'s `lora_A` (`which = "A"`) or `lora_B` in layer `l`.
pub fn tensor_name(l: usize, target: LoraTarget, which: &str) -> String {
    format!("base_model.model.model.layers.{l}.{}.lora_{which}.weight", target.hf_path())
}

/// How many RoPE heads `target`'s output rows form (q and k), else `None`.
fn rope_heads(target: LoraTarget, config: &Config) -> Option<usize> {
    match target {
        LoraTarget::Q => Some(config.n_heads),
        LoraTarget::K => Some(config.n_kv_heads),
        _ => None,
    }
}

/// PEFT's `adapter_config.json` for `lora` (`base` names the base model, if known).
pub fn config_json(lora: &LoraConfig, base: Option<&str>) -> Value {
    let modules: Vec<&str> = lora.targets.iter().map(|t| t.hf_module()).collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "revision": null,
    })
}

/// Writes `lora` (for a base of shape `config`) as a PEFT adapter folder. Each file is
/// written to a temporary name, synced, and renamed into place.
pub fn write_adapter(dir: &Path, config: &Config, lora: &LoraParams, base: Option<&str>) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(|e| error(dir, format!("cannot create the folder: {e}")))?;
    let r = lora.config.rank;
    let mut tensors = Vec::new();
    for s in lora.slots() {
        let (a, b) = lora.adapter(s.layer, s.target).expect("a slot's adapter");
        let b = match rope_heads(s.target, config) {
            Some(heads) => permute_rows(b, heads, r, Rope::InterleavedToHalves),
            None => b.to_vec(),
        };
        tensors.push((tensor_name(s.layer, s.target, "A"), vec![r, s.inp], a.to_vec()));
        tensors.push((tensor_name(s.layer, s.target, "B"), vec![s.out, r], b));
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    llama::hf::write_safetensors(&tmp, &tensors, Dtype::F32).map_err(|e| error(&weights, e.to_string()))?;
    sync_and_rename(&tmp, &weights)?;
    let text = serde_json::to_string_pretty(&config_json(&lora.config, base)).expect("JSON serialises");
    let cfg = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| error(&tmp, format!("cannot write: {e}")))?;
    sync_and_rename(&tmp, &cfg)
}

fn sync_and_rename(tmp: &Path, dest: &Path) -> Result<(), PeftError> {
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| error(tmp, format!("cannot sync: {e}")))?;
    std::fs::rename(tmp, dest).map_err(|e| error(dest, format!("cannot rename {} into place: {e}", tmp.display())))
}

/// Reads `adapter_config.json`: the LoRA settings anetrain can train and apply. Refuses,
/// by field, what it cannot reproduce (rsLoRA, DoRA, fan-in-fan-out layers, trained
/// biases, extra trained modules, per-module ranks).
pub fn read_config(dir: &Path) -> Result<LoraConfig, PeftError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| error(&path, format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| error(&path, format!("not JSON: {e}")))?;
    let field = |name: &str| v.get(name).filter(|x| !x.is_null());
    let bad = |name: &str, why: &str| Err(error(&path, format!("`{name}`: {why}")));
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return bad("peft_type", &format!("{other:?} is not \"LORA\"")),
    }
    let rank = match field("r").and_then(Value::as_u64) {
        Some(r) if r > 0 => r as usize,
        _ => return bad("r", "must be a positive integer"),
    };
    let alpha = match field("lora_alpha").and_then(Value::as_f64) {
        Some(a) if a > 0.0 => a as f32,
        None => crate::lora::DEFAULT_ALPHA,
        Some(a) => return bad("lora_alpha", &format!("{a} must be positive")),
    };
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    for (name, unsupported) in
        [("use_rslora", "rank-stabilised scaling"), ("use_dora", "DoRA"), ("fan_in_fan_out", "Conv1D-style layers")]
    {
        if field(name).and_then(Value::as_bool) == Some(true) {
            return bad(name, &format!("{unsupported} is not supported"));
        }
    }
    if let Some(b) = field("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return bad("bias", &format!("\"{b}\": only \"none\" (no trained biases) is supported"));
    }
    if field("modules_to_save").is_some_and(|m| m.as_array().is_none_or(|a| !a.is_empty())) {
        return bad("modules_to_save", "fully trained extra modules are not supported");
    }
    for name in ["rank_pattern", "alpha_pattern"] {
        if field(name).is_some_and(|m| m.as_object().is_some_and(|o| !o.is_empty())) {
            return bad(name, "per-module ranks and alphas are not supported");
        }
    }
    let targets = match field("target_modules") {
        Some(Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let Some(name) = item.as_str() else { return bad("target_modules", "must list module names") };
                names.push(name.to_string());
            }
            LoraConfig::parse_targets(&names.join(",")).map_err(|e| error(&path, format!("`target_modules`: {e}")))?
        }
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL.to_vec(),
        Some(other) => return bad("target_modules", &format!("{other} is not a list of module names")),
        None => return bad("target_modules", "missing"),
    };
    Ok(LoraConfig { rank, alpha, dropout, targets })
}

/// Reads an adapter folder for a base of shape `config`: every tensor its config implies
/// must be present, with its exact shape (F32, F16 or BF16).
pub fn read_adapter(dir: &Path, config: &Config) -> Result<LoraParams, PeftError> {
    let lora_cfg = read_config(dir)?;
    lora_cfg.validate(config).map_err(|e| error(&dir.join(CONFIG_FILE), e))?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| error(&path, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| error(&path, format!("not a valid safetensors file: {e}")))?;
    let mut lora = LoraParams::zeros(config, &lora_cfg);
    let r = lora_cfg.rank;
    let mut used = 0;
    for s in lora.slots().to_vec() {
        for (which, range, shape) in [("A", s.a.clone(), [r, s.inp]), ("B", s.b.clone(), [s.out, r])] {
            let name = tensor_name(s.layer, s.target, which);
            let view = st.tensor(&name).map_err(|_| error(&path, format!("has no tensor `{name}`")))?;
            if view.shape() != shape {
                return Err(error(&path, format!("`{name}` is {:?}, the base model needs {shape:?}", view.shape())));
            }
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(error(&path, format!("`{name}` is {:?}; F32, F16 and BF16 are read", view.dtype())));
            }
            let dst = &mut lora.as_mut_slice()[range];
            llama::hf::decode(&view, dst);
            if !dst.iter().all(|v| v.is_finite()) {
                return Err(error(&path, format!("`{name}` holds a non-finite value")));
            }
            if which == "B" {
                if let Some(heads) = rope_heads(s.target, config) {
                    let permuted = permute_rows(dst, heads, r, Rope::HalvesToInterleaved);
                    dst.copy_from_slice(&permuted);
                }
            }
            used += 1;
        }
    }
    if st.len() != used {
        let extra = st.names().into_iter().find(|n| !n.contains(".lora_A.") && !n.contains(".lora_B."));
        let what = extra.map_or(String::new(), |n| format!(" (such as `{n}`)"));
        return Err(error(
            &path,
            format!(
                "holds {} tensors, its config implies {used}{what}: layers or modules the base does not have",
                st.len()
            ),
        ));
    }
    Ok(lora)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_round_trips_through_a_peft_folder() {
        let mut model = Config::preset("tiny").unwrap();
        model.n_kv_heads = model.n_heads / 2;
        let cfg = LoraConfig { alpha: 16.0, targets: LoraTarget::ALL.to_vec(), ..LoraConfig::new(4) };
        let mut lora = LoraParams::init(&model, &cfg, 3);
        lora.as_mut_slice().iter_mut().enumerate().for_each(|(i, v)| *v += i as f32 * 1e-3);
        let dir = tempfile::tempdir().unwrap();
        write_adapter(dir.path(), &model, &lora, Some("base")).unwrap();
        let back = read_adapter(dir.path(), &model).unwrap();
        assert_eq!(back, lora);
        // q's B rows are stored in Hugging Face's half-split order: row 1 of head 0
        // (interleaved pair 0, second element) is HF row head_dim/2.
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(&tensor_name(0, LoraTarget::Q, "B")).unwrap();
        let mut hf = vec![0.0; view.shape().iter().product()];
        llama::hf::decode(&view, &mut hf);
        let (_, b) = lora.adapter(0, LoraTarget::Q).unwrap();
        let half = model.head_dim() / 2;
        assert_eq!(hf[half * 4..half * 4 + 4], b[4..8]);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(v["r"], 4);
        assert_eq!(v["target_modules"][0], "q_proj");
    }

    #[test]
    fn unsupported_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |v: Value| std::fs::write(dir.path().join(CONFIG_FILE), v.to_string()).unwrap();
        write(json!({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "use_rslora": true}));
        assert!(read_config(dir.path()).unwrap_err().to_string().contains("`use_rslora`"));
        write(json!({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "lm_head"]}));
        assert!(read_config(dir.path()).unwrap_err().to_string().contains("`lm_head`"));
        write(json!({"peft_type": "IA3", "r": 8}));
        assert!(read_config(dir.path()).unwrap_err().to_string().contains("`peft_type`"));
    }
}
