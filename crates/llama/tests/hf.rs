//! Hugging Face interop: llama2.c's stories260K (grouped-query attention) through
//! safetensors + config.json and back, bit-exact; a forward pass written the Hugging Face
//! way (half-split RoPE, HF tensor names, read straight from the safetensors file)
//! reproduces the reference logits; fp16/bf16 weights; and bad folders give errors that
//! name the tensor, the shapes, the dtype or the architecture. Fails with a clear message
//! when ../shared/fixtures is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llama::hf::{self, Architecture};
use llama::{llama2c, reference, Config, ErrorKind, Params};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures")).join(name);
    assert!(
        path.is_file(),
        "fixture {} is missing: these tests need the shared fixtures folder ../shared/fixtures beside the \
         project root (see its README.md)",
        path.display()
    );
    path
}

fn bits(params: &Params) -> Vec<u32> {
    params.as_slice().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn stories260k_round_trips_through_hugging_face_bit_exactly() {
    let original = llama2c::read_model(fixture("stories260K.bin")).unwrap();
    assert!(original.config().n_kv_heads < original.config().n_heads, "the fixture uses grouped-query attention");
    let dir = tempfile::tempdir().unwrap();
    hf::write_model(&original, dir.path(), Dtype::F32, Some(1), &[2]).unwrap();

    let back = hf::read_model(dir.path()).unwrap();
    assert_eq!(back.hf_config.architecture, Architecture::Llama);
    assert_eq!((back.hf_config.bos_token_id, back.hf_config.eos_token_ids.as_slice()), (Some(1), &[2][..]));
    assert_eq!(back.params.config(), original.config());
    assert_eq!(bits(&back.params), bits(&original));

    // And on to a llama2.c file identical to one written from the original.
    let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
    llama2c::write_model(&original, &a, llama2c::Version::V0).unwrap();
    llama2c::write_model(&back.params, &b, llama2c::Version::V0).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The fixture's own bytes, freq_cis tables aside, are the same too.
    let fixture_bytes = std::fs::read(fixture("stories260K.bin")).unwrap();
    let ours = std::fs::read(&b).unwrap();
    let c = original.config();
    let freq_start = 28 + 4 * (c.n_params()); // shared classifier: freq_cis are the tail
    assert_eq!(ours.len(), fixture_bytes.len());
    assert_eq!(ours[..freq_start], fixture_bytes[..freq_start]);

    // The config says what transformers needs.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 4);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"].as_f64(), Some(10000.0));
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
}

/// Tensors of a safetensors file by name, as f32.
fn load_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32);
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// A forward pass written the way transformers' modeling_llama / modeling_qwen2 computes,
/// on Hugging Face tensor names: `rotate_half` RoPE (pairs `(i, i + head_dim/2)`),
/// `x·Wᵀ (+ b)`, f64 accumulation. Returns the logits at every position.
fn hf_forward(
    t: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    config: &serde_json::Value,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let get = |name: &str| &t.get(name).unwrap_or_else(|| panic!("{name} missing")).1;
    let u = |f: &str| config[f].as_u64().unwrap() as usize;
    let (dim, n_layers, n_heads, n_kv) =
        (u("hidden_size"), u("num_hidden_layers"), u("num_attention_heads"), u("num_key_value_heads"));
    let (eps, theta) = (config["rms_norm_eps"].as_f64().unwrap(), config["rope_theta"].as_f64().unwrap());
    let head_dim = config["head_dim"].as_u64().map_or(dim / n_heads, |h| h as usize);
    let half = head_dim / 2;
    // transformers `_compute_default_rope_parameters`, then `_compute_llama3_parameters`.
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let scaling = &config["rope_scaling"];
            if scaling.is_null() {
                return freq;
            }
            assert_eq!(scaling["rope_type"], "llama3");
            let f = |k: &str| scaling[k].as_f64().unwrap();
            let (factor, low, high, old) =
                (f("factor"), f("low_freq_factor"), f("high_freq_factor"), f("original_max_position_embeddings"));
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let scaled = if wavelen > old / low { freq / factor } else { freq };
            let smooth = (old / wavelen - low) / (high - low);
            let medium = wavelen >= old / high && wavelen <= old / low; // transformers: ~(w < high_w) * ~(w > low_w)
            if medium {
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect();
    let linear = |x: &[f64], w: &[f32], b: Option<&Vec<f32>>| -> Vec<f64> {
        let n = x.len();
        (0..w.len() / n)
            .map(|o| {
                let s: f64 = (0..n).map(|i| w[o * n + i] as f64 * x[i]).sum();
                s + b.map_or(0.0, |b| b[o] as f64)
            })
            .collect()
    };
    let rmsnorm = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(w).map(|(v, &g)| v * r * g as f64).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(head_dim) {
            for i in 0..half {
                let angle = pos as f64 * inv_freq[i];
                let (sin, cos) = angle.sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    };
    let emb = get("model.embed_tokens.weight");
    let head = t.get("lm_head.weight").map_or(emb, |h| &h.1);
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); n_layers];
    let mut values: Vec<Vec<Vec<f64>>> = vec![Vec::new(); n_layers];
    let mut out = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = emb[tok as usize * dim..(tok as usize + 1) * dim].iter().map(|&v| v as f64).collect();
        for l in 0..n_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let h = rmsnorm(&x, get(&p("input_layernorm.weight")));
            let bias = |s: &str| t.get(&p(s)).map(|b| &b.1);
            let mut q = linear(&h, get(&p("self_attn.q_proj.weight")), bias("self_attn.q_proj.bias"));
            let mut k = linear(&h, get(&p("self_attn.k_proj.weight")), bias("self_attn.k_proj.bias"));
            let v = linear(&h, get(&p("self_attn.v_proj.weight")), bias("self_attn.v_proj.bias"));
            // Qwen3: RMSNorm over each head of q and k, before RoPE.
            if let (Some(qn), Some(kn)) = (bias("self_attn.q_norm.weight"), bias("self_attn.k_norm.weight")) {
                q = q.chunks(head_dim).flat_map(|head| rmsnorm(head, qn)).collect();
                k = k.chunks(head_dim).flat_map(|head| rmsnorm(head, kn)).collect();
            }
            rope(&mut q, pos);
            rope(&mut k, pos);
            keys[l].push(k);
            values[l].push(v);
            let mut attn = vec![0.0; n_heads * head_dim];
            for hq in 0..n_heads {
                let hk = hq / (n_heads / n_kv);
                let qh = &q[hq * head_dim..(hq + 1) * head_dim];
                let scores: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| {
                        qh.iter().zip(&k[hk * head_dim..(hk + 1) * head_dim]).map(|(a, b)| a * b).sum::<f64>()
                            / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (w, v) in e.iter().zip(&values[l]) {
                    for d in 0..head_dim {
                        attn[hq * head_dim + d] += w / sum * v[hk * head_dim + d];
                    }
                }
            }
            let o = linear(&attn, get(&p("self_attn.o_proj.weight")), None);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rmsnorm(&x, get(&p("post_attention_layernorm.weight")));
            let gate = linear(&h, get(&p("mlp.gate_proj.weight")), None);
            let up = linear(&h, get(&p("mlp.up_proj.weight")), None);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = linear(&act, get(&p("mlp.down_proj.weight")), None);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let h = rmsnorm(&x, get("model.norm.weight"));
        out.push(linear(&h, head, None));
    }
    out
}

fn assert_logits_close(ours: &[Vec<f32>], theirs: &[Vec<f64>], what: &str) {
    for (pos, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-4 * scale.max(1.0), "{what}: position {pos}: max |Δlogit| {worst} (scale {scale})");
    }
}

#[test]
fn a_hugging_face_style_forward_on_the_exported_tensors_reproduces_our_logits() {
    let params = llama2c::read_model(fixture("stories260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    hf::write_model(&params, dir.path(), Dtype::F32, Some(1), &[2]).unwrap();
    let tensors = load_tensors(&dir.path().join("model.safetensors"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let tokens = [1, 403, 407, 261, 378, 300, 5, 80, 499, 2];
    let ours = reference::forward_sequence(&params, &tokens).unwrap();
    let theirs = hf_forward(&tensors, &config, &tokens);
    assert_logits_close(&ours, &theirs, "stories260K");
    // Without the q/k permutation the Hugging Face forward computes something else.
    let mut unpermuted = tensors.clone();
    for l in 0..params.config().n_layers {
        let wq = params.layer(l).wq().to_vec();
        unpermuted.get_mut(&format!("model.layers.{l}.self_attn.q_proj.weight")).unwrap().1 = wq;
    }
    let wrong = hf_forward(&unpermuted, &config, &tokens);
    let diff = ours[5].iter().zip(&wrong[5]).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(diff > 1e-3, "the permutation must matter (max diff {diff})");
}

/// A small random model with Qwen2's features: QKV biases, θ = 1e6, ε = 1e-6, GQA, tied.
fn qwen_like() -> Params {
    let config = Config { qkv_bias: true, norm_eps: 1e-6, rope_theta: 1e6, ..Config::new(64, 96, 2, 4, 2, 300, 64) };
    let mut params = Params::init(&config, 3).unwrap();
    // Biases and norms away from their init values so that every tensor matters.
    for (spec, values) in params.tensors_mut() {
        if !spec.is_matrix() {
            values.iter_mut().enumerate().for_each(|(i, v)| *v += 0.05 * ((i * 7 + spec.offset) % 11) as f32 - 0.2);
        }
    }
    params
}

#[test]
fn a_qwen2_shaped_model_round_trips_and_matches_the_hugging_face_forward() {
    let params = qwen_like();
    let dir = tempfile::tempdir().unwrap();
    hf::write_model(&params, dir.path(), Dtype::F32, None, &[299]).unwrap();
    let back = hf::read_model(dir.path()).unwrap();
    assert_eq!(back.hf_config.architecture, Architecture::Qwen2);
    assert_eq!(back.params.config(), params.config());
    assert_eq!(bits(&back.params), bits(&params));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(config["rope_theta"].as_f64(), Some(1e6));
    let tokens = [5, 17, 250, 3, 99, 42];
    let ours = reference::forward_sequence(&params, &tokens).unwrap();
    let theirs = hf_forward(&load_tensors(&dir.path().join("model.safetensors")), &config, &tokens);
    assert_logits_close(&ours, &theirs, "qwen-like");
}

/// Random models with Qwen3's features (QK-norm, head_dim 32 ≠ dim 64 / 4 heads, GQA,
/// tied) and Llama 3's (llama3 RoPE scaling with all three frequency regimes at this
/// width, θ = 500000, untied), norms and biases away from their init.
fn qwen3_and_llama3_like() -> Vec<(Architecture, Params)> {
    let base = Config::new(64, 96, 2, 4, 2, 300, 64);
    let qwen3 = Config { qk_norm: true, explicit_head_dim: Some(32), norm_eps: 1e-6, rope_theta: 1e6, ..base.clone() };
    let scaling = llama::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let llama3 = Config { rope_theta: 5e5, rope_scaling: Some(scaling), shared_classifier: false, ..base };
    [(Architecture::Qwen3, qwen3), (Architecture::Llama, llama3)]
        .into_iter()
        .map(|(arch, config)| {
            let mut params = Params::init(&config, 5).unwrap();
            for (spec, values) in params.tensors_mut() {
                if !spec.is_matrix() {
                    values
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v += 0.07 * ((i * 5 + spec.offset) % 13) as f32 - 0.3);
                }
            }
            (arch, params)
        })
        .collect()
}

#[test]
fn qwen3_and_llama3_shaped_models_round_trip_and_match_the_hugging_face_forward() {
    for (architecture, params) in qwen3_and_llama3_like() {
        let dir = tempfile::tempdir().unwrap();
        hf::write_model(&params, dir.path(), Dtype::F32, Some(1), &[299]).unwrap();
        let back = hf::read_model(dir.path()).unwrap();
        assert_eq!(back.hf_config.architecture, architecture);
        assert_eq!(back.params.config(), params.config());
        assert_eq!(bits(&back.params), bits(&params));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        let tokens = [5, 17, 250, 3, 99, 42, 7, 8, 9, 10, 11, 12];
        let ours = reference::forward_sequence(&params, &tokens).unwrap();
        let tensors = load_tensors(&dir.path().join("model.safetensors"));
        let theirs = hf_forward(&tensors, &config, &tokens);
        assert_logits_close(&ours, &theirs, architecture.name());
        // Each new feature matters: without it the Hugging Face forward differs.
        let mut without = config.clone();
        match architecture {
            Architecture::Qwen3 => {
                let mut t = tensors.clone();
                t.retain(|name, _| !name.contains("_norm.weight") || name.contains("layernorm"));
                let wrong = hf_forward(&t, &without, &tokens);
                let diff = ours[4].iter().zip(&wrong[4]).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(diff > 1e-3, "QK-norm must matter (max diff {diff})");
            }
            _ => {
                without["rope_scaling"] = serde_json::Value::Null;
                let wrong = hf_forward(&tensors, &without, &tokens);
                let diff = ours[11].iter().zip(&wrong[11]).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(diff > 1e-4, "RoPE scaling must matter (max diff {diff})");
            }
        }
        // llama2.c files cannot hold these models: the writer says why.
        let e = llama2c::write_model(&params, dir.path().join("m.bin"), llama2c::Version::V1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    }
}

#[test]
fn half_precision_weights_load_as_their_rounded_values() {
    let params = qwen_like();
    for (dtype, round) in [
        (Dtype::F16, (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32),
        (Dtype::BF16, |v: f32| half::bf16::from_f32(v).to_f32()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        hf::write_model(&params, dir.path(), dtype, None, &[]).unwrap();
        let back = hf::read_model(dir.path()).unwrap();
        assert_eq!(back.dtype, dtype);
        let want: Vec<u32> = params.as_slice().iter().map(|&v| round(v).to_bits()).collect();
        assert_eq!(bits(&back.params), want, "{dtype:?}");
    }
}

/// Rewrites a model folder's safetensors with `edit` applied to the tensor list.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let params = hf::read_model(dir).unwrap().params;
    let mut tensors = hf::to_hf_tensors(&params);
    edit(&mut tensors);
    hf::write_safetensors(dir.join("model.safetensors"), &tensors, Dtype::F32).unwrap();
}

#[test]
fn bad_folders_name_the_tensor_shape_dtype_or_architecture() {
    let params = qwen_like();
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        hf::write_model(&params, dir.path(), Dtype::F32, None, &[]).unwrap();
        dir
    };

    let dir = fresh();
    edit_tensors(dir.path(), |t| t.retain(|(name, _, _)| name != "model.layers.1.self_attn.k_proj.bias"));
    let e = hf::read_model(dir.path()).unwrap_err();
    assert!(e.message.contains("tensor model.layers.1.self_attn.k_proj.bias (shape [32]) is missing"), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    let dir = fresh();
    edit_tensors(dir.path(), |t| {
        let k = t.iter_mut().find(|(name, _, _)| name == "model.layers.0.self_attn.k_proj.weight").unwrap();
        k.1 = vec![64, 64];
        k.2 = vec![0.0; 64 * 64];
    });
    let e = hf::read_model(dir.path()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Mismatch);
    assert!(
        e.message.contains(
            "tensor model.layers.0.self_attn.k_proj.weight has shape [64, 64], but config.json implies [32, 64]"
        ),
        "{e}"
    );

    // A wrong dtype: an int64 tensor where a weight belongs.
    let dir = fresh();
    {
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let ints = vec![0u8; 8 * 64];
        let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
        let norm = views.iter_mut().find(|(n, _)| n == "model.norm.weight").unwrap();
        norm.1 = safetensors::tensor::TensorView::new(Dtype::I64, vec![64], &ints).unwrap();
        let out = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), out).unwrap();
    }
    let e = hf::read_model(dir.path()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(
        e.message.contains("tensor model.norm.weight has dtype I64") && e.message.contains("F32, F16 and BF16"),
        "{e}"
    );

    // A tensor the layout has no place for.
    let dir = fresh();
    edit_tensors(dir.path(), |t| t.push(("model.layers.0.self_attn.q_norm.weight".into(), vec![16], vec![1.0; 16])));
    let e = hf::read_model(dir.path()).unwrap_err();
    assert!(e.message.contains("model.layers.0.self_attn.q_norm.weight has no place"), "{e}");

    // An architecture we do not read.
    let dir = fresh();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("Qwen2ForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&path, text).unwrap();
    let e = hf::read_model(dir.path()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message.contains("architecture GPT2LMHeadModel is not supported"), "{e}");
    assert!(e.message.contains("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"), "{e}");
    assert!(e.to_string().contains("config.json"), "{e}");

    // No weights at all.
    let dir = fresh();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = hf::read_model(dir.path()).unwrap_err();
    assert!(e.message.contains("no model.safetensors"), "{e}");

    // A tied model whose lm_head differs from the embedding.
    let dir = fresh();
    edit_tensors(dir.path(), |t| t.push(("lm_head.weight".into(), vec![300, 64], vec![0.5; 300 * 64])));
    let e = hf::read_model(dir.path()).unwrap_err();
    assert!(e.message.contains("lm_head.weight differs"), "{e}");
}
