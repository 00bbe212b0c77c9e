//! Real data and real model formats through the `anetrain` binary: Hugging Face export
//! and import of llama2.c's stories260K (bit-exact round trip), `generate` on a tiny
//! random Qwen2-shaped folder (bf16 safetensors, byte-level tokenizer.json, QKV biases,
//! θ = 1e6, tied, GQA, padded vocabulary) against a naive Hugging Face-style forward
//! written here, `data pretokenize` with all three tokenizer kinds (thread-count
//! independent), `tokenizer train` (exact round trip on arbitrary UTF-8), and the errors
//! for bad inputs. Needs ../shared/fixtures and fails saying so when it is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llama::hf::{self, Dtype};
use llama::tokenizers::AnyTokenizer;
use llama::Tokenizer;
use proptest::prelude::*;

mod common;
use common::{anetrain, failed_with, ok};

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(name);
    assert!(
        path.is_file(),
        "fixture {} is missing: these tests compare against files made by other programs and need the \
         shared fixtures folder (see shared/fixtures/README.md)",
        path.display()
    );
    path
}

/// stories260K.bin with tok512.bin beside it as tokenizer.bin, in `dir`.
fn stories260k_in(dir: &Path) -> PathBuf {
    let model = dir.join("stories260K.bin");
    std::fs::copy(fixture("stories260K.bin"), &model).unwrap();
    std::fs::copy(fixture("tok512.bin"), dir.join("tokenizer.bin")).unwrap();
    model
}

// ---------------------------------------------------------------------------------------
// export --to-hf / import-hf
// ---------------------------------------------------------------------------------------

#[test]
fn export_to_hugging_face_and_import_back_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    stories260k_in(d);
    ok(&anetrain(d, &["export", "stories260K.bin", "--to-hf", "hf"]));
    for file in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.bin"] {
        assert!(d.join("hf").join(file).is_file(), "export wrote no {file}");
    }
    ok(&anetrain(d, &["import-hf", "hf", "--to", "back/model.bin"]));
    ok(&anetrain(d, &["export", "stories260K.bin", "--to", "direct/model.bin"]));
    assert_eq!(std::fs::read(d.join("back/model.bin")).unwrap(), std::fs::read(d.join("direct/model.bin")).unwrap());
    assert_eq!(std::fs::read(d.join("back/tokenizer.bin")).unwrap(), std::fs::read(fixture("tok512.bin")).unwrap());

    // The exported tokenizer.json encodes like tok512.bin.
    let json = AnyTokenizer::open(d.join("hf/tokenizer.json")).unwrap();
    let bin = Tokenizer::read(fixture("tok512.bin")).unwrap();
    let text = "Once upon a time, there was a little girl named Lily.";
    assert_eq!(json.encode_prompt(text).unwrap(), bin.encode(text, true, false));

    let out = anetrain(d, &["export", "stories260K.bin"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn generate_on_the_exported_folder_reproduces_llama2c_greedy_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    stories260k_in(d);
    ok(&anetrain(d, &["export", "stories260K.bin", "--to-hf", "hf"]));
    // llama2.c ran 256 positions from BOS, each printing the token it predicts.
    let out = anetrain(d, &["generate", "--model", "hf", "--steps", "256", "--device", "cpu"]);
    let stdout = ok(&out);
    let want = std::fs::read_to_string(fixture("stories260K.greedy-256.txt")).unwrap();
    assert_eq!(stdout, want, "greedy text through the Hugging Face folder differs from llama2.c's run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prefill 1 tokens at") && stderr.contains("decode 255 tokens at"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// A tiny Qwen2-shaped model
// ---------------------------------------------------------------------------------------

/// GPT-2's byte → printable character table (`bytes_to_unicode`), which byte-level BPE
/// vocabularies (GPT-2, Qwen) are written in.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    printable.clear();
    chars
}

/// Named tensors: `(Hugging Face name, shape, values)`.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

const QWEN_VOCAB: usize = 300; // embedding rows; the tokenizer has fewer ids (padding)
const QWEN_DIM: usize = 64;
const QWEN_HIDDEN: usize = 96;
const QWEN_LAYERS: usize = 2;
const QWEN_HEADS: usize = 4;
const QWEN_KV_HEADS: usize = 2;

/// A byte-level BPE tokenizer.json in Qwen's style: ids 0..256 the bytes, a few merges,
/// then `<|endoftext|>`. Returns the JSON and the end-of-text id.
fn qwen_tokenizer_json() -> (String, u32) {
    let chars = byte_chars();
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let sp = chars[b' ' as usize];
    let merges: Vec<(String, String)> = vec![
        (format!("{sp}"), "t".into()),
        ("h".into(), "e".into()),
        (format!("{sp}t"), "he".into()),
        ("o".into(), "n".into()),
        (format!("{sp}"), "a".into()),
        ("c".into(), "e".into()),
    ];
    for (l, r) in &merges {
        vocab.push(format!("{l}{r}"));
    }
    let eot = vocab.len() as u32;
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, p)| (p.clone(), serde_json::json!(i))).collect();
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merges.iter().map(|(l, r)| vec![l.clone(), r.clone()]).collect::<Vec<_>>()},
    });
    (json.to_string(), eot)
}

/// Named tensors of a random Qwen2-shaped model, values rounded to bf16 so that the
/// bf16 file holds them exactly.
fn qwen_tensors(seed: u64) -> Tensors {
    let mut state = seed;
    let mut random = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
                half::bf16::from_f32(offset + scale * u).to_f32()
            })
            .collect()
    };
    let (d, h, kv) = (QWEN_DIM, QWEN_HIDDEN, QWEN_DIM / QWEN_HEADS * QWEN_KV_HEADS);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![QWEN_VOCAB, d], random(QWEN_VOCAB * d, 2.0, 0.0))];
    for l in 0..QWEN_LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![d], random(d, 0.5, 1.0)));
        t.push((p("self_attn.q_proj.weight"), vec![d, d], random(d * d, 0.5, 0.0)));
        t.push((p("self_attn.q_proj.bias"), vec![d], random(d, 0.5, 0.0)));
        t.push((p("self_attn.k_proj.weight"), vec![kv, d], random(kv * d, 0.5, 0.0)));
        t.push((p("self_attn.k_proj.bias"), vec![kv], random(kv, 0.5, 0.0)));
        t.push((p("self_attn.v_proj.weight"), vec![kv, d], random(kv * d, 0.5, 0.0)));
        t.push((p("self_attn.v_proj.bias"), vec![kv], random(kv, 0.5, 0.0)));
        t.push((p("self_attn.o_proj.weight"), vec![d, d], random(d * d, 0.3, 0.0)));
        t.push((p("post_attention_layernorm.weight"), vec![d], random(d, 0.5, 1.0)));
        t.push((p("mlp.gate_proj.weight"), vec![h, d], random(h * d, 0.5, 0.0)));
        t.push((p("mlp.up_proj.weight"), vec![h, d], random(h * d, 0.5, 0.0)));
        t.push((p("mlp.down_proj.weight"), vec![d, h], random(d * h, 0.3, 0.0)));
    }
    t.push(("model.norm.weight".to_string(), vec![d], random(d, 0.5, 1.0)));
    t
}

fn qwen_config(eot: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": QWEN_DIM, "intermediate_size": QWEN_HIDDEN, "num_hidden_layers": QWEN_LAYERS,
        "num_attention_heads": QWEN_HEADS, "num_key_value_heads": QWEN_KV_HEADS, "vocab_size": QWEN_VOCAB,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "hidden_act": "silu", "use_sliding_window": false,
        "sliding_window": 32768, "max_window_layers": 21, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": "bfloat16", "attention_dropout": 0.0, "initializer_range": 0.02, "rope_scaling": null
    })
}

/// Writes the tiny Qwen2 folder; returns the tensors and the end-of-text id.
fn write_qwen(dir: &Path) -> (Tensors, u32) {
    std::fs::create_dir_all(dir).unwrap();
    let (tokenizer, eot) = qwen_tokenizer_json();
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    std::fs::write(dir.join("config.json"), qwen_config(eot).to_string()).unwrap();
    let tensors = qwen_tensors(0x5eed);
    hf::write_safetensors(dir.join("model.safetensors"), &tensors, Dtype::BF16).unwrap();
    (tensors, eot)
}

/// transformers' Qwen2 forward, naively, in f64, on Hugging Face names: `rotate_half`
/// RoPE on (i, i + head_dim/2), `x·Wᵀ + b`, tied classifier. Logits at every position.
fn naive_qwen_forward(tensors: &Tensors, tokens: &[u32]) -> Vec<Vec<f64>> {
    let t: HashMap<&str, &Vec<f32>> = tensors.iter().map(|(n, _, v)| (n.as_str(), v)).collect();
    let get = |name: &str| *t.get(name).unwrap_or_else(|| panic!("{name}"));
    let (dim, head_dim) = (QWEN_DIM, QWEN_DIM / QWEN_HEADS);
    let (eps, theta, half) = (1e-6f64, 1e6f64, head_dim / 2);
    let linear = |x: &[f64], w: &[f32], b: Option<&Vec<f32>>| -> Vec<f64> {
        let n = x.len();
        (0..w.len() / n)
            .map(|o| (0..n).map(|i| w[o * n + i] as f64 * x[i]).sum::<f64>() + b.map_or(0.0, |b| b[o] as f64))
            .collect()
    };
    let rmsnorm = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
        x.iter().zip(w).map(|(v, &g)| v * r * g as f64).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(head_dim) {
            for i in 0..half {
                let (sin, cos) = (pos as f64 / theta.powf(2.0 * i as f64 / head_dim as f64)).sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    };
    let emb = get("model.embed_tokens.weight");
    let (mut keys, mut values) = (vec![Vec::<Vec<f64>>::new(); QWEN_LAYERS], vec![Vec::<Vec<f64>>::new(); QWEN_LAYERS]);
    let mut out = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = emb[tok as usize * dim..(tok as usize + 1) * dim].iter().map(|&v| v as f64).collect();
        for l in 0..QWEN_LAYERS {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let h = rmsnorm(&x, get(&p("input_layernorm.weight")));
            let mut q = linear(&h, get(&p("self_attn.q_proj.weight")), Some(get(&p("self_attn.q_proj.bias"))));
            let mut k = linear(&h, get(&p("self_attn.k_proj.weight")), Some(get(&p("self_attn.k_proj.bias"))));
            let v = linear(&h, get(&p("self_attn.v_proj.weight")), Some(get(&p("self_attn.v_proj.bias"))));
            rope(&mut q, pos);
            rope(&mut k, pos);
            keys[l].push(k);
            values[l].push(v);
            let mut attn = vec![0.0; dim];
            for hq in 0..QWEN_HEADS {
                let hk = hq / (QWEN_HEADS / QWEN_KV_HEADS);
                let qh = &q[hq * head_dim..(hq + 1) * head_dim];
                let s: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| {
                        let dot: f64 = qh.iter().zip(&k[hk * head_dim..(hk + 1) * head_dim]).map(|(a, b)| a * b).sum();
                        dot / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (w, v) in e.iter().zip(&values[l]) {
                    for c in 0..head_dim {
                        attn[hq * head_dim + c] += w / sum * v[hk * head_dim + c];
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
        out.push(linear(&rmsnorm(&x, get("model.norm.weight")), emb, None));
    }
    out
}

fn argmax(values: &[f64]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

#[test]
fn the_device_decoder_on_a_loaded_qwen2_folder_matches_the_naive_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, _) = write_qwen(dir.path());
    let model = hf::read_model(dir.path()).unwrap();
    assert_eq!(model.dtype, Dtype::BF16);
    let mut config = model.params.config().clone();
    assert!(config.qkv_bias && config.shared_classifier);
    assert_eq!((config.rope_theta, config.norm_eps, config.seq_len), (1e6, 1e-6, 32768));
    config.seq_len = 64;
    let params = llama::Params::from_vec(&config, model.params.into_vec()).unwrap();
    let tokens = [5u32, 120, 7, 261, 99, 33, 250, 0, 17];
    let want = naive_qwen_forward(&tensors, &tokens);
    let device = device::cpu::CpuDevice::new(device::Precision::Fp32);
    let mut decoder = train::model::Decoder::new(&device, &params).unwrap();
    // Prefill the first five in one call, then one token at a time.
    let mut got = vec![decoder.forward(&tokens[..5]).unwrap()];
    for &token in &tokens[5..] {
        got.push(decoder.forward(&[token]).unwrap());
    }
    for (i, logits) in got.iter().enumerate() {
        let pos = if i == 0 { 4 } else { 4 + i };
        let reference = &want[pos];
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let worst = logits.iter().zip(reference).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4 * scale, "position {pos}: max |Δlogit| {worst}, logits up to {scale}");
    }
}

#[test]
fn generate_streams_the_naive_forwards_greedy_text_from_a_qwen2_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, eot) = write_qwen(&dir.path().join("qwen"));
    let tokenizer = AnyTokenizer::open(dir.path().join("qwen/tokenizer.json")).unwrap();
    let prompt = "the cat on the hat";
    let mut tokens = tokenizer.encode_prompt(prompt).unwrap();
    let n_prompt = tokens.len();
    assert!(n_prompt < prompt.len(), "merges apply: {tokens:?}");
    let steps = 12;
    for _ in 0..steps {
        let logits = naive_qwen_forward(&tensors, &tokens);
        // Rows past the tokenizer's ids are padding and never chosen.
        let next = argmax(&logits.last().unwrap()[..tokenizer.vocab_size()]) as u32;
        if next == eot {
            break;
        }
        tokens.push(next);
    }
    let want = tokenizer.decode(&tokens).unwrap();

    let out = anetrain(
        dir.path(),
        &["generate", "--model", "qwen", "--prompt", prompt, "--steps", &steps.to_string(), "--device", "cpu"],
    );
    let stdout = ok(&out);
    assert_eq!(stdout, format!("{want}\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Qwen2ForCausalLM") && stderr.contains("BF16"), "{stderr}");
    assert!(stderr.contains(&format!("prefill {n_prompt} tokens at")) && stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn bad_model_folders_and_tokenizers_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_qwen(&d.join("qwen"));

    // A Qwen2 model has biases llama2.c's format cannot hold.
    let out = anetrain(d, &["import-hf", "qwen", "--to", "q.bin"]);
    failed_with(&out, &["Qwen2ForCausalLM", "no place for QKV biases"]);

    // A tokenizer with more ids than the model has rows.
    let out = anetrain(
        d,
        &["generate", "--model", "qwen", "--tokenizer", fixture("llama2-tokenizer.model").to_str().unwrap()],
    );
    failed_with(&out, &["tokenizer has 32000 tokens, model has 300"]);

    // An architecture we do not run.
    let config = d.join("qwen/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("Qwen2ForCausalLM", "Gemma2ForCausalLM")).unwrap();
    let out = anetrain(d, &["generate", "--model", "qwen", "--device", "cpu"]);
    failed_with(
        &out,
        &[
            "config.json",
            "Gemma2ForCausalLM is not supported",
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        ],
    );
    std::fs::write(&config, text).unwrap();

    // A misshaped tensor.
    let mut tensors = qwen_tensors(1);
    tensors.iter_mut().find(|t| t.0 == "model.layers.1.mlp.up_proj.weight").unwrap().1 = vec![QWEN_DIM, QWEN_HIDDEN];
    hf::write_safetensors(d.join("qwen/model.safetensors"), &tensors, Dtype::F16).unwrap();
    let out = anetrain(d, &["generate", "--model", "qwen", "--device", "cpu"]);
    failed_with(&out, &["model.layers.1.mlp.up_proj.weight has shape [64, 96], but config.json implies [96, 64]"]);
}

// ---------------------------------------------------------------------------------------
// data pretokenize
// ---------------------------------------------------------------------------------------

const STORIES: [&str; 4] = [
    "Once upon a time, there was a little girl named Lily.",
    "  Tom had a red ball. He liked to play with it every day.\n\"Can I play?\" asked Sam.  ",
    "The sun was hot. Café, naïve, 日本 🙂.",
    "One day, a big dog came to the park.",
];

fn write_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let json = dir.join("data00.json");
    let objects: Vec<serde_json::Value> =
        STORIES.iter().map(|s| serde_json::json!({"story": s, "instruction": {"words": ["x"]}})).collect();
    std::fs::write(&json, serde_json::to_string(&objects).unwrap()).unwrap();
    let txt = dir.join("extra.txt");
    std::fs::write(&txt, STORIES.join("\n\n \n")).unwrap();
    (json, txt)
}

fn read_shard(path: &Path) -> Vec<u32> {
    std::fs::read(path).unwrap().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect()
}

#[test]
fn pretokenize_writes_bos_separated_shards_independent_of_threads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_inputs(d);
    let bin = Tokenizer::read(fixture("tok512.bin")).unwrap();
    let expected: Vec<u32> = STORIES.iter().flat_map(|s| bin.encode(s.trim(), true, false)).collect();
    let tok512 = fixture("tok512.bin");
    for threads in ["1", "4"] {
        let out = format!("out{threads}");
        let args = ["data", "pretokenize", "--tokenizer", tok512.to_str().unwrap(), "--in", "data00.json", "extra.txt"];
        let mut args = args.to_vec();
        args.extend(["--out", &out, "--threads", threads, "--quiet"]);
        let run = anetrain(d, &args);
        ok(&run);
        assert!(String::from_utf8_lossy(&run.stderr).contains(&format!("on {threads} threads")));
        assert_eq!(read_shard(&d.join(&out).join("data00.bin")), expected, "{threads} threads, JSON input");
        assert_eq!(read_shard(&d.join(&out).join("extra.bin")), expected, "{threads} threads, text input");
    }
    assert_eq!(std::fs::read(d.join("out1/data00.bin")).unwrap(), std::fs::read(d.join("out4/data00.bin")).unwrap());

    // The SentencePiece model and a tokenizer.json give their own encodings.
    let llama2 = Tokenizer::read(fixture("llama2-tokenizer.bin")).unwrap();
    let expected: Vec<u32> = STORIES.iter().flat_map(|s| llama2.encode(s.trim(), true, false)).collect();
    let model = fixture("llama2-tokenizer.model");
    ok(&anetrain(
        d,
        &["data", "pretokenize", "--tokenizer", model.to_str().unwrap(), "--in", "data00.json", "--out", "sp"],
    ));
    assert_eq!(read_shard(&d.join("sp/data00.bin")), expected);
    assert_eq!(read_shard(&d.join("sp/data00.bin"))[..5], [1, 9038, 2501, 263, 931]);

    let json = llama::tokenizers::tokenizer_json(&bin).unwrap();
    std::fs::write(d.join("tokenizer.json"), json.to_string()).unwrap();
    ok(&anetrain(d, &["data", "pretokenize", "--tokenizer", "tokenizer.json", "--in", "extra.txt", "--out", "hf"]));
    assert_eq!(std::fs::read(d.join("hf/extra.bin")).unwrap(), std::fs::read(d.join("out1/extra.bin")).unwrap());
}

#[test]
fn pretokenize_refuses_big_vocabularies_and_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_inputs(d);
    // A word-level tokenizer.json with 70,000 ids (`<s>` among them): they do not fit u16 shards.
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..70_000).map(|i| (if i == 1 { "<s>".into() } else { format!("w{i}") }, serde_json::json!(i))).collect();
    let json = serde_json::json!({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
        "pre_tokenizer": {"type": "Whitespace"}, "added_tokens": [], "normalizer": null, "post_processor": null,
        "decoder": null, "truncation": null, "padding": null});
    std::fs::write(d.join("big.json"), json.to_string()).unwrap();
    let big = ["data", "pretokenize", "--tokenizer", "big.json", "--in", "data00.json", "--out", "o"];
    let out = anetrain(d, &[&big[..], &["--width", "u16"]].concat());
    failed_with(&out, &["70000 token ids", "65536", "u32"]);
    assert!(!d.join("o").exists());
    // Without the choice such a vocabulary gets u32 shards, marked by their header.
    ok(&anetrain(d, &big));
    let shards: Vec<_> = std::fs::read_dir(d.join("o")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!shards.is_empty());
    for shard in shards {
        assert!(std::fs::read(&shard).unwrap().starts_with(b"ANETOKNS"), "{}", shard.display());
    }
    std::fs::remove_dir_all(d.join("o")).unwrap();

    let tok = fixture("tok512.bin");
    std::fs::write(d.join("bad.json"), r#"[{"story": "ok"}, {"text": "no story"}]"#).unwrap();
    let out =
        anetrain(d, &["data", "pretokenize", "--tokenizer", tok.to_str().unwrap(), "--in", "bad.json", "--out", "o"]);
    failed_with(&out, &["bad.json", "missing field `story`"]);
}

// ---------------------------------------------------------------------------------------
// tokenizer train
// ---------------------------------------------------------------------------------------

fn trained_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_inputs(d);
        let out = anetrain(
            d,
            &["tokenizer", "train", "--vocab", "400", "--in", "data00.json", "extra.txt", "--out", "t/tok.bin"],
        );
        ok(&out);
        assert!(String::from_utf8_lossy(&out.stderr).contains("pieces from 8 stories"));
        Tokenizer::read(d.join("t/tok.bin")).unwrap()
    })
}

#[test]
fn tokenizer_train_writes_a_usable_vocabulary() {
    let tok = trained_tokenizer();
    assert!(tok.vocab_size() > 259 && tok.vocab_size() <= 400, "{}", tok.vocab_size());
    let text = STORIES[0];
    let ids = tok.encode(text, false, false);
    assert!(ids.len() < text.len() * 3 / 4, "merges shorten the text: {} ids for {} bytes", ids.len(), text.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn trained_tokenizer_round_trips_arbitrary_utf8(text in any::<String>()) {
        let tok = trained_tokenizer();
        let ids = tok.encode(&text, true, false);
        prop_assert_eq!(String::from_utf8(tok.decode_all(&ids).unwrap()).unwrap(), text);
    }
}
