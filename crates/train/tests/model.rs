//! The device decoder against llama's plain reference forward pass, on random models
//! with and without grouped-query attention, in both precisions and both dialects.

use device::{cpu::CpuDevice, Precision};
use llama::{reference, Config, Params};
use train::model::Decoder;

fn config(n_kv_heads: usize) -> Config {
    Config {
        dim: 48,
        hidden_dim: 96,
        n_layers: 2,
        n_heads: 6,
        n_kv_heads,
        vocab_size: 61,
        seq_len: 40,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        qkv_bias: false,
        shared_classifier: n_kv_heads == 6,
        explicit_head_dim: None,
        qk_norm: false,
        rope_scaling: None,
    }
}

/// Max |a − b| / max(1, max |b|) over the logits.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// The reference forward's logits at every position of `tokens`.
fn reference_logits(params: &Params, config: &Config, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = reference::KvCache::new(config);
    tokens.iter().enumerate().map(|(pos, &t)| reference::forward(params, &mut cache, t, pos).unwrap()).collect()
}

fn check(n_kv: usize, precision: Precision, dialect: mil::Dialect, tolerance: f32) {
    check_config(config(n_kv), precision, dialect, tolerance)
}

fn check_config(config: Config, precision: Precision, dialect: mil::Dialect, tolerance: f32) {
    let n_kv = config.n_kv_heads;
    let vocab = config.vocab_size as u32;
    let mut params = Params::init(&config, 42).unwrap();
    // Norm gains and biases away from their init (1 and 0), so that each one matters.
    for (spec, values) in params.tensors_mut() {
        if !spec.is_matrix() {
            values.iter_mut().enumerate().for_each(|(i, v)| *v += 0.05 * ((i * 7 + spec.offset) % 9) as f32 - 0.2);
        }
    }
    let device = CpuDevice::new(precision).with_dialect(dialect);
    let mut decoder = Decoder::new(&device, &params).unwrap();
    decoder.prefill_chunk = 8;
    let tokens: Vec<u32> = (0..30).map(|i| (i * 17 + 3) % vocab).collect();
    let want = reference_logits(&params, &config, &tokens);
    // A 19-token prefill (chunks of 8, 8, 3), then one token at a time.
    let got = decoder.forward(&tokens[..19]).unwrap();
    let e = rel_err(&got, &want[18]);
    assert!(e < tolerance, "kv {n_kv} {precision:?} {dialect:?}: prefill logits off by {e}");
    for pos in 19..tokens.len() {
        let got = decoder.forward(&tokens[pos..pos + 1]).unwrap();
        let e = rel_err(&got, &want[pos]);
        assert!(e < tolerance, "kv {n_kv} {precision:?} {dialect:?}: position {pos} off by {e}");
    }
}

#[test]
fn fp32_decoding_matches_the_reference() {
    for n_kv in [6, 2] {
        for dialect in [mil::Dialect::Ios18, mil::Dialect::Ios16] {
            // ios16 has fp16 surfaces, so its inputs and outputs round (2⁻¹¹ relative)
            // even in fp32 mode; ios18 is fp32 end to end and differs only in summation
            // order.
            let tol = if dialect == mil::Dialect::Ios18 { 1e-4 } else { 1e-2 };
            check(n_kv, Precision::Fp32, dialect, tol);
        }
    }
}

/// Sizes whose one-token products are split between threads (the CPU device's GEMV
/// threads products of 2¹⁶ multiply–adds and more: the classifier's 701 × 200, the FFN's
/// 344 × 200), with odd vocabulary and hidden widths and grouped-query attention.
#[test]
fn fp32_decoding_matches_the_reference_at_threaded_sizes() {
    let config = Config { dim: 200, hidden_dim: 344, n_heads: 4, n_kv_heads: 2, vocab_size: 701, ..config(2) };
    check_config(config, Precision::Fp32, mil::Dialect::Ios18, 1e-4);
}

/// Qwen3 (QK-norm, heads 16 wide so the queries are 96 wide against dim 48, GQA) and
/// Llama 3 (llama3 RoPE scaling in all three regimes at head_dim 8 over 30 positions).
#[test]
fn qwen3_and_llama3_decoding_matches_the_reference() {
    // Heads of 32: 1/√32 has no exact fp16 value, so this also checks the kernels' split
    // attention scale (`kernels::attention_scale`): one rounded factor is off by 1e-4.
    let qwen3 = Config { qk_norm: true, explicit_head_dim: Some(32), norm_eps: 1e-6, rope_theta: 1e6, ..config(2) };
    let scaling = llama::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    };
    let llama3 = Config { rope_scaling: Some(scaling), rope_theta: 5e5, shared_classifier: false, ..config(2) };
    for config in [qwen3, llama3] {
        for dialect in [mil::Dialect::Ios18, mil::Dialect::Ios16] {
            let tol = if dialect == mil::Dialect::Ios18 { 1e-5 } else { 1e-2 };
            check_config(config.clone(), Precision::Fp32, dialect, tol);
        }
        check_config(config, Precision::Fp16, mil::Dialect::Ios18, 3e-2);
    }
}

#[test]
fn fp16_decoding_stays_close_to_the_reference() {
    // Every op rounds to fp16 (2⁻¹¹ relative); through two layers of ~10 ops the logits
    // stay within a few percent of their scale. A wrong kernel is off by O(1).
    for n_kv in [6, 2] {
        check(n_kv, Precision::Fp16, mil::Dialect::Ios18, 3e-2);
    }
}

#[test]
fn running_past_the_context_is_an_error() {
    let config = config(2);
    let params = Params::init(&config, 1).unwrap();
    let device = CpuDevice::new(Precision::Fp32);
    let mut decoder = Decoder::new(&device, &params).unwrap();
    let tokens = vec![1u32; 41];
    let e = decoder.forward(&tokens).unwrap_err();
    assert!(e.to_string().contains("context of 40"), "{e}");
}

/// The classifier runs as device kernels, one per part of the vocabulary, so that no
/// dimension passes the ANE's limit (Qwen2.5's 151936-row head needs three). With parts
/// of 16 rows a 61-token vocabulary splits into 4 (16, 16, 16, 13): every part's logits
/// land in their place, on a Qwen2-shaped model (QKV biases, GQA, unshared head).
#[test]
fn the_classifier_split_into_parts_matches_the_reference() {
    let config = Config { qkv_bias: true, norm_eps: 1e-6, rope_theta: 1e6, shared_classifier: false, ..config(2) };
    let params = Params::init(&config, 7).unwrap();
    let device = CpuDevice::new(Precision::Fp32);
    let mut decoder = Decoder::new(&device, &params).unwrap();
    decoder.head_part_rows = 16;
    let tokens: Vec<u32> = (0..12).map(|i| (i * 29 + 5) % 61).collect();
    let want = reference_logits(&params, &config, &tokens);
    let got = decoder.forward(&tokens[..5]).unwrap();
    assert_eq!(decoder.head_kernels(), 4);
    assert!(rel_err(&got, &want[4]) < 1e-4, "prefill logits off by {}", rel_err(&got, &want[4]));
    for pos in 5..tokens.len() {
        let got = decoder.forward(&tokens[pos..pos + 1]).unwrap();
        assert!(rel_err(&got, &want[pos]) < 1e-4, "position {pos} off by {}", rel_err(&got, &want[pos]));
    }
    // Parts and their rows.
    assert_eq!(train::kernels::classifier_parts(61, 16), [(0, 16), (16, 32), (32, 48), (48, 61)]);
    assert_eq!(train::kernels::classifier_parts(151936, train::model::HEAD_PART_ROWS).len(), 3);
}
