//! The reference forward pass against a second, independently written one: whole
//! sequences at once in f64, attention with an explicit causal mask, RoPE as complex
//! multiplication (the shape of llama2.c's PyTorch `model.py`), tensors fetched by name.

use llama::{reference, Config, Params};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Parameters with O(1) activations everywhere (init's 0.02 would make every logit ≈ 0
/// and the comparison toothless): matrices N(0, 1/fan_in), norm gains 1 ± 0.3, biases N(0, 0.5²).
fn lively_params(config: &Config, seed: u64) -> Params {
    let mut params = Params::zeros(config).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (spec, values) in params.tensors_mut() {
        let std = if spec.is_matrix() {
            1.0 / (spec.shape[1] as f32).sqrt()
        } else if spec.name.contains("rms") {
            0.3
        } else {
            0.5
        };
        let normal = Normal::new(0.0f32, std).unwrap();
        let base = if spec.name.contains("rms") { 1.0 } else { 0.0 };
        values.iter_mut().for_each(|v| *v = base + normal.sample(&mut rng));
    }
    // The embedding is a lookup, not a projection: give its rows unit-scale entries.
    params.token_embedding_mut().iter_mut().for_each(|v| *v *= 8.0);
    params
}

type Matrix = Vec<Vec<f64>>; // [rows][cols]

/// y[t] = W · x[t] for W [out, in] row-major.
fn linear(x: &Matrix, w: &[f32], out: usize) -> Matrix {
    x.iter()
        .map(|row| {
            (0..out).map(|o| row.iter().enumerate().map(|(i, &v)| w[o * row.len() + i] as f64 * v).sum()).collect()
        })
        .collect()
}

fn rmsnorm(x: &Matrix, gain: &[f32], eps: f64) -> Matrix {
    x.iter()
        .map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let r = 1.0 / (ms + eps).sqrt();
            row.iter().zip(gain).map(|(v, &g)| v * r * g as f64).collect()
        })
        .collect()
}

/// Rotates each head's pairs as complex numbers: (a + ib) · e^{i·t·θ^(-2j/head_dim)}.
fn rope(x: &mut Matrix, head_dim: usize, theta: f64) {
    for (t, row) in x.iter_mut().enumerate() {
        for head in row.chunks_mut(head_dim) {
            for j in 0..head_dim / 2 {
                let angle = t as f64 * theta.powf(-((2 * j) as f64) / head_dim as f64);
                let (a, b) = (head[2 * j], head[2 * j + 1]);
                let (c, s) = (angle.cos(), angle.sin());
                head[2 * j] = a * c - b * s;
                head[2 * j + 1] = a * s + b * c;
            }
        }
    }
}

fn naive_forward(params: &Params, tokens: &[u32]) -> Matrix {
    let c = params.config();
    let (dim, hd, kv_dim) = (c.dim, c.head_dim(), c.kv_dim());
    let eps = c.norm_eps as f64;
    let t_len = tokens.len();
    let get = |name: String| params.by_name(&name).unwrap_or_else(|| panic!("no tensor {name}"));
    let emb = get("token_embedding".into());
    let mut x: Matrix =
        tokens.iter().map(|&t| emb[t as usize * dim..][..dim].iter().map(|&v| v as f64).collect()).collect();

    for l in 0..c.n_layers {
        let w = |name: &str| get(format!("layers.{l}.{name}"));
        let add_bias = |m: &mut Matrix, name: &str| {
            if c.qkv_bias {
                for row in m.iter_mut() {
                    row.iter_mut().zip(w(name)).for_each(|(v, &b)| *v += b as f64);
                }
            }
        };
        let xn = rmsnorm(&x, w("rms_att"), eps);
        let mut q = linear(&xn, w("wq"), dim);
        let mut k = linear(&xn, w("wk"), kv_dim);
        let mut v = linear(&xn, w("wv"), kv_dim);
        add_bias(&mut q, "bq");
        add_bias(&mut k, "bk");
        add_bias(&mut v, "bv");
        rope(&mut q, hd, c.rope_theta as f64);
        rope(&mut k, hd, c.rope_theta as f64);

        // Full score matrix per head, masked above the diagonal.
        let mut attn_out: Matrix = vec![vec![0.0; dim]; t_len];
        for h in 0..c.n_heads {
            let g = h / (c.n_heads / c.n_kv_heads); // repeat_interleave of K/V heads
            for t in 0..t_len {
                let scores: Vec<f64> = (0..t_len)
                    .map(|s| {
                        if s > t {
                            f64::NEG_INFINITY
                        } else {
                            (0..hd).map(|i| q[t][h * hd + i] * k[s][g * hd + i]).sum::<f64>() / (hd as f64).sqrt()
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for i in 0..hd {
                    attn_out[t][h * hd + i] = (0..t_len).map(|s| exps[s] / total * v[s][g * hd + i]).sum();
                }
            }
        }
        let o = linear(&attn_out, w("wo"), dim);
        x.iter_mut().zip(&o).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));

        let xn = rmsnorm(&x, w("rms_ffn"), eps);
        let gate = linear(&xn, w("w1"), c.hidden_dim);
        let up = linear(&xn, w("w3"), c.hidden_dim);
        let hidden: Matrix = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect())
            .collect();
        let down = linear(&hidden, w("w2"), dim);
        x.iter_mut().zip(&down).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    }
    let xn = rmsnorm(&x, get("rms_final".into()), eps);
    let classifier = params.by_name("wcls").unwrap_or(emb);
    linear(&xn, classifier, c.vocab_size)
}

fn assert_close(ours: &[Vec<f32>], naive: &Matrix, what: &str) {
    assert_eq!(ours.len(), naive.len());
    let scale = naive.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1.0, "{what}: logits too small ({scale}) for a meaningful comparison");
    for (t, (a, b)) in ours.iter().zip(naive).enumerate() {
        for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
            let err = (a as f64 - b).abs();
            assert!(err < 2e-4 * scale, "{what}: position {t} logit {i}: {a} vs {b} (scale {scale})");
        }
    }
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 131 + 7) % vocab) as u32).collect()
}

#[test]
fn grouped_query_attention_matches_the_naive_model() {
    let config = Config { n_layers: 2, seq_len: 32, ..Config::preset("tiny").unwrap() };
    assert_eq!(config.kv_group(), 2);
    let params = lively_params(&config, 1);
    let toks = tokens(13, config.vocab_size);
    assert_close(&reference::forward_sequence(&params, &toks).unwrap(), &naive_forward(&params, &toks), "GQA");
}

#[test]
fn biases_separate_classifier_and_custom_constants_match_the_naive_model() {
    let config = Config {
        n_layers: 2,
        n_kv_heads: 1, // multi-query
        seq_len: 16,
        qkv_bias: true,
        shared_classifier: false,
        rope_theta: 500_000.0,
        norm_eps: 1e-6,
        ..Config::preset("tiny").unwrap()
    };
    let params = lively_params(&config, 2);
    let toks = tokens(16, config.vocab_size);
    assert_close(&reference::forward_sequence(&params, &toks).unwrap(), &naive_forward(&params, &toks), "biased");
}

#[test]
fn multi_head_attention_matches_the_naive_model() {
    let config = Config::new(48, 96, 1, 3, 3, 40, 8);
    let params = lively_params(&config, 3);
    let toks = tokens(8, config.vocab_size);
    assert_close(&reference::forward_sequence(&params, &toks).unwrap(), &naive_forward(&params, &toks), "MHA");
}

#[test]
fn grouped_query_equals_multi_head_with_repeated_kv_heads() {
    // A GQA model and the MHA model whose K/V heads are copies (head h reads group h/2)
    // compute the very same numbers: the logits agree bit for bit.
    let gqa = Config { n_layers: 2, seq_len: 16, ..Config::preset("tiny").unwrap() };
    let mha = Config { n_kv_heads: gqa.n_heads, ..gqa.clone() };
    let small = lively_params(&gqa, 4);
    let mut big = Params::zeros(&mha).unwrap();
    let hd = gqa.head_dim();
    for ((spec, dst), (_, _, src)) in big.tensors_mut().zip(small.tensors()) {
        if spec.name.ends_with(".wk") || spec.name.ends_with(".wv") {
            for h in 0..mha.n_heads {
                let g = h / gqa.kv_group();
                let rows = hd * gqa.dim;
                dst[h * rows..(h + 1) * rows].copy_from_slice(&src[g * rows..(g + 1) * rows]);
            }
        } else {
            dst.copy_from_slice(src);
        }
    }
    let toks = tokens(16, gqa.vocab_size);
    let a = reference::forward_sequence(&small, &toks).unwrap();
    let b = reference::forward_sequence(&big, &toks).unwrap();
    assert_eq!(a, b);
}

#[test]
fn cache_positions_are_independent_of_later_tokens() {
    // Causality: logits at position t depend only on tokens 0..=t.
    let config = Config { n_layers: 2, seq_len: 16, ..Config::preset("tiny").unwrap() };
    let params = lively_params(&config, 5);
    let a = reference::forward_sequence(&params, &[1, 2, 3, 4, 5, 6]).unwrap();
    let b = reference::forward_sequence(&params, &[1, 2, 3, 9, 9, 9]).unwrap();
    assert_eq!(a[..3], b[..3]);
    assert_ne!(a[3], b[3]);
}
