//! The reference forward pass: plain fp32 loops, one token at a time with a KV cache,
//! in the same order of operations as llama2.c `run.c` `forward()`.
//!
//! This is the independent yardstick every faster forward pass (the MIL kernels on the
//! CPU device or the ANE) is tested against, so it stays obvious rather than fast: no
//! SIMD, no threads, no fusion. Sums run left to right in fp32 as run.c's do, which is
//! what lets it reproduce llama2.c's greedy output token for token.
//!
//! Per layer, for the token at position `pos` (`x: [dim]`):
//!
//! ```text
//! xb = rmsnorm(x) · rms_att
//! q = Wq·xb (+bq)  [q_dim]    k = Wk·xb (+bk)  [kv_dim]      v = Wv·xb (+bv)  [kv_dim]
//! per head: q_h = rmsnorm(q_h) · q_norm, k_h = rmsnorm(k_h) · k_norm   (only with qk_norm)
//! RoPE(q, k, pos)                          (interleaved pairs, frequencies config.rope_freqs())
//! per head h:  att = softmax(q_h · K_{g(h)}[0..=pos] / √head_dim),  out_h = att · V_{g(h)}
//! x += Wo·out
//! xb = rmsnorm(x) · rms_ffn
//! x += W2·(silu(W1·xb) ⊙ W3·xb)
//! ```
//!
//! then `logits = Wcls · (rmsnorm(x) · rms_final)`. `g(h) = h / (n_heads / n_kv_heads)`
//! is the K/V head query head `h` reads (grouped-query attention).

use crate::config::Config;
use crate::error::{err, Result};
use crate::params::Params;

/// Keys and values of every layer at every position seen so far.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// [n_layers, seq_len, kv_dim]
    keys: Vec<f32>,
    /// [n_layers, seq_len, kv_dim]
    values: Vec<f32>,
    seq_len: usize,
    kv_dim: usize,
}

impl KvCache {
    /// An empty cache for `config`'s `seq_len` positions.
    pub fn new(config: &Config) -> KvCache {
        let len = config.n_layers * config.seq_len * config.kv_dim();
        KvCache { keys: vec![0.0; len], values: vec![0.0; len], seq_len: config.seq_len, kv_dim: config.kv_dim() }
    }

    fn row(&self, layer: usize, pos: usize) -> std::ops::Range<usize> {
        let start = (layer * self.seq_len + pos) * self.kv_dim;
        start..start + self.kv_dim
    }
}

/// `out = W · x` for `W: [out.len(), x.len()]` row-major (run.c `matmul`).
pub fn matmul(out: &mut [f32], x: &[f32], w: &[f32]) {
    let n = x.len();
    assert_eq!(w.len(), out.len() * n, "matmul: W has {} values, want {}·{}", w.len(), out.len(), n);
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[i * n..(i + 1) * n];
        let mut sum = 0.0f32;
        for (a, b) in row.iter().zip(x) {
            sum += a * b;
        }
        *o = sum;
    }
}

/// `out = weight ⊙ x / sqrt(mean(x²) + eps)` (run.c `rmsnorm`).
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let mut ss = 0.0f32;
    for &v in x {
        ss += v * v;
    }
    ss /= x.len() as f32;
    ss += eps;
    let scale = 1.0 / ss.sqrt();
    for ((o, &w), &v) in out.iter_mut().zip(weight).zip(x) {
        *o = w * (scale * v);
    }
}

/// Rotates interleaved pairs `(v[i], v[i+1])` of every head by `pos · θ^(-(i mod head_dim)/head_dim)`:
/// RoPE as run.c applies it. `vec` holds whole heads of `head_dim` values each.
pub fn rope(vec: &mut [f32], pos: usize, head_dim: usize, theta: f32) {
    let freqs: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    rope_with(vec, pos, &freqs);
}

/// [`rope`] with explicit frequencies: pair `j` of every head (`freqs.len()` pairs per
/// head, [`Config::rope_freqs`]) turns by `pos · freqs[j]`.
pub fn rope_with(vec: &mut [f32], pos: usize, freqs: &[f32]) {
    let head_dim = 2 * freqs.len();
    for i in (0..vec.len()).step_by(2) {
        let freq = freqs[(i % head_dim) / 2];
        let angle = pos as f32 * freq;
        let (fcr, fci) = (angle.cos(), angle.sin());
        let (v0, v1) = (vec[i], vec[i + 1]);
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
    }
}

/// The logits `[vocab]` for `token` at position `pos`, after writing this position's keys
/// and values into `cache`. Positions must be fed in order 0, 1, 2, … (each attends to
/// the cache entries `0..=pos`). Errors on a token outside the vocabulary, a position at
/// or past `seq_len`, or a cache made for another config.
pub fn forward(params: &Params, cache: &mut KvCache, token: u32, pos: usize) -> Result<Vec<f32>> {
    let c = params.config();
    let (dim, q_dim, kv_dim, hidden, head_dim) = (c.dim, c.q_dim(), c.kv_dim(), c.hidden_dim, c.head_dim());
    let freqs = c.rope_freqs();
    if token as usize >= c.vocab_size {
        return Err(err!(Input, "token id {token} is outside the {}-token vocabulary", c.vocab_size));
    }
    if pos >= c.seq_len {
        return Err(err!(Input, "position {pos} is past the model's seq_len {}", c.seq_len));
    }
    if cache.keys.len() != c.n_layers * c.seq_len * kv_dim || cache.kv_dim != kv_dim {
        return Err(err!(Mismatch, "the KV cache was made for a different model config"));
    }

    // x: [dim], the residual stream.
    let mut x = params.token_embedding()[token as usize * dim..(token as usize + 1) * dim].to_vec();
    let mut xb = vec![0.0f32; dim];
    let mut xb2 = vec![0.0f32; dim];
    let mut att_out = vec![0.0f32; q_dim];
    let mut q = vec![0.0f32; q_dim];
    let mut k = vec![0.0f32; kv_dim];
    let mut v = vec![0.0f32; kv_dim];
    let mut hb = vec![0.0f32; hidden];
    let mut hb2 = vec![0.0f32; hidden];
    let mut att = vec![0.0f32; pos + 1];

    for l in 0..c.n_layers {
        let layer = params.layer(l);

        // Attention.
        rmsnorm(&mut xb, &x, layer.rms_att(), c.norm_eps);
        matmul(&mut q, &xb, layer.wq());
        matmul(&mut k, &xb, layer.wk());
        matmul(&mut v, &xb, layer.wv());
        if let Some((bq, bk, bv)) = layer.qkv_bias() {
            q.iter_mut().zip(bq).for_each(|(a, b)| *a += b);
            k.iter_mut().zip(bk).for_each(|(a, b)| *a += b);
            v.iter_mut().zip(bv).for_each(|(a, b)| *a += b);
        }
        if let Some((q_norm, k_norm)) = layer.qk_norm() {
            head_rmsnorm(&mut q, q_norm, c.norm_eps);
            head_rmsnorm(&mut k, k_norm, c.norm_eps);
        }
        rope_with(&mut q, pos, &freqs);
        rope_with(&mut k, pos, &freqs);
        let row = cache.row(l, pos);
        cache.keys[row.clone()].copy_from_slice(&k);
        cache.values[row].copy_from_slice(&v);

        for h in 0..c.n_heads {
            let kv_head = h / c.kv_group();
            let q_h = &q[h * head_dim..(h + 1) * head_dim];
            for (t, score) in att.iter_mut().enumerate() {
                let k_t = &cache.keys[cache.row(l, t)][kv_head * head_dim..(kv_head + 1) * head_dim];
                let mut dot = 0.0f32;
                for (a, b) in q_h.iter().zip(k_t) {
                    dot += a * b;
                }
                *score = dot / (head_dim as f32).sqrt();
            }
            crate::sampler::softmax(&mut att);
            let out_h = &mut att_out[h * head_dim..(h + 1) * head_dim];
            out_h.fill(0.0);
            for (t, &a) in att.iter().enumerate() {
                let v_t = &cache.values[cache.row(l, t)][kv_head * head_dim..(kv_head + 1) * head_dim];
                for (o, v) in out_h.iter_mut().zip(v_t) {
                    *o += a * v;
                }
            }
        }
        matmul(&mut xb2, &att_out, layer.wo());
        x.iter_mut().zip(&xb2).for_each(|(a, b)| *a += b);

        // Feed-forward: w2(silu(w1·xb) ⊙ w3·xb).
        rmsnorm(&mut xb, &x, layer.rms_ffn(), c.norm_eps);
        matmul(&mut hb, &xb, layer.w1());
        matmul(&mut hb2, &xb, layer.w3());
        for (g, &u) in hb.iter_mut().zip(&hb2) {
            let silu = *g * (1.0 / (1.0 + (-*g).exp()));
            *g = silu * u;
        }
        matmul(&mut xb, &hb, layer.w2());
        x.iter_mut().zip(&xb).for_each(|(a, b)| *a += b);
    }

    let mut normed = vec![0.0f32; dim];
    rmsnorm(&mut normed, &x, params.rms_final(), c.norm_eps);
    let mut logits = vec![0.0f32; c.vocab_size];
    matmul(&mut logits, &normed, params.classifier());
    Ok(logits)
}

/// RMSNorm of every `weight.len()`-wide head of `x` in place, with gain `weight`
/// (Qwen3's `q_norm` / `k_norm`).
pub fn head_rmsnorm(x: &mut [f32], weight: &[f32], eps: f32) {
    let mut head = vec![0.0f32; weight.len()];
    for chunk in x.chunks_mut(weight.len()) {
        head.copy_from_slice(chunk);
        rmsnorm(chunk, &head, weight, eps);
    }
}

/// Logits at every position of `tokens` (`result[t]` predicts `tokens[t + 1]`), running
/// [`forward`] over a fresh cache. At most `seq_len` tokens.
pub fn forward_sequence(params: &Params, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut cache = KvCache::new(params.config());
    tokens.iter().enumerate().map(|(pos, &token)| forward(params, &mut cache, token, pos)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_preserves_pair_norms_and_is_identity_at_zero() {
        let v: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut r = v.clone();
        rope(&mut r, 0, 8, 10000.0);
        assert_eq!(r, v);
        rope(&mut r, 17, 8, 10000.0);
        for i in (0..16).step_by(2) {
            let before = v[i].hypot(v[i + 1]);
            let after = r[i].hypot(r[i + 1]);
            assert!((before - after).abs() < 1e-5, "pair {i}");
        }
        // Pair 0 of each head turns by exactly pos radians (frequency θ^0 = 1).
        let mut e = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut e, 3, 4, 10000.0);
        assert!((e[0] - 3f32.cos()).abs() < 1e-6 && (e[1] - 3f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rmsnorm_of_a_constant_vector_is_the_weight() {
        let mut out = [0.0f32; 4];
        rmsnorm(&mut out, &[3.0; 4], &[1.0, 2.0, 3.0, 4.0], 0.0);
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let config = Config { seq_len: 4, ..Config::preset("tiny").unwrap() };
        let params = Params::init(&config, 1).unwrap();
        let mut cache = KvCache::new(&config);
        let e = forward(&params, &mut cache, 512, 0).unwrap_err();
        assert!(e.message.contains("token id 512"), "{e}");
        let e = forward(&params, &mut cache, 5, 4).unwrap_err();
        assert!(e.message.contains("position 4"), "{e}");
        let e = forward_sequence(&params, &[1, 2, 3, 4, 5]).unwrap_err();
        assert!(e.message.contains("position 4 is past the model's seq_len 4"), "{e}");
        let mut other = KvCache::new(&Config::preset("stories260k").unwrap());
        let e = forward(&params, &mut other, 5, 0).unwrap_err();
        assert!(e.message.contains("different model config"), "{e}");
    }
}
