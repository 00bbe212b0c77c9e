//! Every CPU op against an independent f64 reference written here from the formulas:
//! forwards against the reference values, backwards against central finite differences
//! of a scalar loss `L = Σ r·out` (random `r`) computed with the reference in f64.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::cpu_ops::*;

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Central differences of `f` at `x`, one coordinate at a time.
fn finite_difference(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    const H: f64 = 1e-5;
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let saved = x[i];
            x[i] = saved + H;
            let up = f(&x);
            x[i] = saved - H;
            let down = f(&x);
            x[i] = saved;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Asserts `got` (f32) matches `want` (f64) to `tol` relative to the largest `|want|`.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs() / scale;
        assert!(err < tol, "{what}[{i}]: got {g}, want {w} (error {err:e} of max |want| {scale})");
    }
}

fn weighted_sum(out: &[f64], r: &[f64]) -> f64 {
    out.iter().zip(r).map(|(a, b)| a * b).sum()
}

// ---------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------

fn embedding_reference(table: &[f64], tokens: &[u32], dim: usize) -> Vec<f64> {
    let t_len = tokens.len();
    let mut x = vec![0.0; dim * t_len];
    for (t, &tok) in tokens.iter().enumerate() {
        for d in 0..dim {
            x[d * t_len + t] = table[tok as usize * dim + d];
        }
    }
    x
}

#[test]
fn embedding_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // dim 300 spans three channel blocks of 128; vocab 11 splits into several row ranges.
    for dim in [37, 300] {
        let vocab = 11;
        let tokens = [3u32, 0, 10, 3, 7, 3, 1];
        let table = random(&mut rng, vocab * dim, 1.0);
        let mut x = vec![f32::NAN; dim * tokens.len()];
        embedding_forward(&mut x, &table, &tokens, dim);
        assert_close("x", &x, &embedding_reference(&to_f64(&table), &tokens, dim), 1e-7);

        let r = random(&mut rng, x.len(), 1.0);
        let prior = random(&mut rng, table.len(), 1.0);
        let mut dtable = prior.clone();
        embedding_backward(&mut dtable, &r, &tokens, dim);
        let numeric = finite_difference(
            |table| weighted_sum(&embedding_reference(table, &tokens, dim), &to_f64(&r)),
            &to_f64(&table),
        );
        let want: Vec<f64> = numeric.iter().zip(&prior).map(|(n, &p)| n + f64::from(p)).collect();
        assert_close("dtable (accumulated)", &dtable, &want, 1e-6);
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------

fn rmsnorm_reference(x: &[f64], w: &[f64], t_len: usize, eps: f64) -> Vec<f64> {
    let channels = w.len();
    let mut y = vec![0.0; x.len()];
    for t in 0..t_len {
        let ms: f64 = (0..channels).map(|c| x[c * t_len + t].powi(2)).sum::<f64>() / channels as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for c in 0..channels {
            y[c * t_len + t] = x[c * t_len + t] * inv * w[c];
        }
    }
    y
}

#[test]
fn rmsnorm_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // T = 70 spans two column tiles of 64; C = 13 channels.
    let (channels, t_len, eps) = (13, 70, 1e-5f32);
    let x = random(&mut rng, channels * t_len, 2.0);
    let w = random(&mut rng, channels, 1.5);
    let mut y = vec![f32::NAN; x.len()];
    let mut inv_rms = vec![f32::NAN; t_len];
    rmsnorm_forward(&mut y, &mut inv_rms, &x, &w, eps);
    let (x64, w64) = (to_f64(&x), to_f64(&w));
    assert_close("y", &y, &rmsnorm_reference(&x64, &w64, t_len, f64::from(eps)), 1e-6);

    let r = random(&mut rng, x.len(), 1.0);
    let dx_prior = random(&mut rng, x.len(), 1.0);
    let dw_prior = random(&mut rng, channels, 1.0);
    let (mut dx, mut dw) = (dx_prior.clone(), dw_prior.clone());
    let mut scratch = vec![f32::NAN; t_len];
    rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &inv_rms, &mut scratch);

    let r64 = to_f64(&r);
    let eps64 = f64::from(eps);
    let dx_num = finite_difference(|x| weighted_sum(&rmsnorm_reference(x, &w64, t_len, eps64), &r64), &x64);
    let dw_num = finite_difference(|w| weighted_sum(&rmsnorm_reference(&x64, w, t_len, eps64), &r64), &w64);
    let add = |n: Vec<f64>, p: &[f32]| n.iter().zip(p).map(|(n, &p)| n + f64::from(p)).collect::<Vec<_>>();
    assert_close("dx", &dx, &add(dx_num, &dx_prior), 1e-5);
    assert_close("dweight", &dw, &add(dw_num, &dw_prior), 1e-5);
}

// ---------------------------------------------------------------------------------------
// Classifier + cross-entropy
// ---------------------------------------------------------------------------------------

/// Mean over positions of −log softmax(Wcls·x[:, t])[target[t]], all in f64.
fn classifier_loss_reference(x: &[f64], wcls: &[f64], targets: &[u32], vocab: usize, dim: usize) -> f64 {
    let t_len = targets.len();
    let mut total = 0.0;
    for (t, &target) in targets.iter().enumerate() {
        let logits: Vec<f64> =
            (0..vocab).map(|v| (0..dim).map(|d| wcls[v * dim + d] * x[d * t_len + t]).sum()).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() + max;
        total += log_sum - logits[target as usize];
    }
    total / t_len as f64
}

#[test]
fn classifier_cross_entropy_forward_and_backward() {
    // Both orientations of the gradient products (the width picks one by default).
    for transposed in [true, false] {
        classifier_case(transposed);
    }
}

fn classifier_case(transposed: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // chunk 4 over T = 9: two full chunks and a partial one.
    let (vocab, dim, t_len, chunk) = (37, 11, 9, 4);
    let x = random(&mut rng, dim * t_len, 1.0);
    let wcls = random(&mut rng, vocab * dim, 1.0);
    let targets: Vec<u32> = (0..t_len).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let (x64, w64) = (to_f64(&x), to_f64(&wcls));
    let want_loss = classifier_loss_reference(&x64, &w64, &targets, vocab, dim);

    let mut classifier = ClassifierLoss::new(vocab, dim, chunk).with_transposed_gradients(transposed);
    let loss_only = classifier.forward(&x, &wcls, &targets);
    assert!((f64::from(loss_only) - want_loss).abs() < 1e-5, "forward loss {loss_only}, want {want_loss}");

    let grad_scale = 3.0f32;
    let dx_prior = random(&mut rng, x.len(), 1.0);
    let dw_prior = random(&mut rng, wcls.len(), 1.0);
    let (mut dx, mut dwcls) = (dx_prior.clone(), dw_prior.clone());
    let loss = classifier.forward_backward(&x, &wcls, &targets, grad_scale, &mut dx, &mut dwcls);
    assert!((f64::from(loss) - want_loss).abs() < 1e-5, "forward_backward loss {loss}, want {want_loss}");

    let s = f64::from(grad_scale);
    let dx_num = finite_difference(|x| s * classifier_loss_reference(x, &w64, &targets, vocab, dim), &x64);
    let dw_num = finite_difference(|w| s * classifier_loss_reference(&x64, w, &targets, vocab, dim), &w64);
    let dx_want: Vec<f64> = dx_num.iter().zip(&dx_prior).map(|(n, &p)| n + f64::from(p)).collect();
    let dw_want: Vec<f64> = dw_num.iter().zip(&dw_prior).map(|(n, &p)| n + f64::from(p)).collect();
    assert_close("dx", &dx, &dx_want, 1e-5);
    assert_close("dwcls", &dwcls, &dw_want, 1e-5);

    // A second call starts afresh: nothing of the first call's sums is carried over.
    let (mut dx2, mut dw2) = (vec![0.0f32; x.len()], vec![0.0f32; wcls.len()]);
    classifier.forward_backward(&x, &wcls, &targets, grad_scale, &mut dx2, &mut dw2);
    assert_close("dx, second call", &dx2, &dx_num, 1e-5);
    assert_close("dwcls, second call", &dw2, &dw_num, 1e-5);
}

#[test]
fn classifier_handles_full_vocabulary_and_long_batches() {
    // V = 32000 and T = 2048 (Stories110M's vocabulary, batch 8 × seq 256) with a
    // narrow dim: with a zero classifier every logit is 0, so the loss is exactly ln V
    // and the gradient of each logit row is (1/V − onehot)/T.
    let (vocab, dim, t_len) = (32000, 4, 2048);
    let x = vec![0.5f32; dim * t_len];
    let wcls = vec![0.0f32; vocab * dim];
    let targets: Vec<u32> = (0..t_len as u32).map(|t| (t * 15) % vocab as u32).collect();
    let mut classifier = ClassifierLoss::new(vocab, dim, DEFAULT_CLASSIFIER_CHUNK);
    let (mut dx, mut dwcls) = (vec![0.0f32; x.len()], vec![0.0f32; wcls.len()]);
    let loss = classifier.forward_backward(&x, &wcls, &targets, 1.0, &mut dx, &mut dwcls);
    let ln_v = (vocab as f64).ln();
    assert!((f64::from(loss) - ln_v).abs() < 1e-5, "loss {loss}, want ln V = {ln_v}");
    assert!(dx.iter().all(|&g| g == 0.0), "dx = Wclsᵀ·dlogits must be 0 for a zero classifier");
    // dWcls[v, d] = Σ_t dlogits[v, t] · 0.5 = 0.5 · (T/V − count(v as target)) / T
    for v in [0usize, 1, 15, 30, 31999] {
        let count = targets.iter().filter(|&&t| t as usize == v).count() as f64;
        let want = 0.5 * (t_len as f64 / vocab as f64 - count) / t_len as f64;
        let got = f64::from(dwcls[v * dim]);
        assert!((got - want).abs() < 1e-7, "dwcls[{v}] = {got}, want {want}");
    }
}

#[test]
fn softmax_cross_entropy_rows_matches_reference() {
    // Large logits test the max-shift: a naive exp would overflow.
    let vocab = 5;
    let mut logits = vec![1000.0f32, 1001.0, 999.0, 1000.5, -50.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let targets = [1u32, 4];
    let rows: Vec<Vec<f64>> = logits.chunks(vocab).map(to_f64).collect();
    let sum = softmax_cross_entropy_rows(&mut logits, &targets, vocab, 2.0);
    let mut want_sum = 0.0;
    for (row, (&target, got)) in rows.iter().zip(targets.iter().zip(logits.chunks(vocab))) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|l| (l - max).exp()).sum();
        want_sum += z.ln() + max - row[target as usize];
        let want_grad: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(i, l)| 2.0 * ((l - max).exp() / z - if i == target as usize { 1.0 } else { 0.0 }))
            .collect();
        assert_close("dlogits", got, &want_grad, 1e-6);
    }
    assert!((sum - want_sum).abs() < 1e-5, "loss sum {sum}, want {want_sum}");
}

// ---------------------------------------------------------------------------------------
// SiLU, SwiGLU
// ---------------------------------------------------------------------------------------

fn silu64(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn silu_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, 50, 6.0);
    let mut y = vec![f32::NAN; x.len()];
    silu_forward(&mut y, &x);
    let x64 = to_f64(&x);
    assert_close("silu", &y, &x64.iter().map(|&v| silu64(v)).collect::<Vec<_>>(), 1e-6);

    let r = random(&mut rng, x.len(), 1.0);
    let prior = random(&mut rng, x.len(), 1.0);
    let mut dx = prior.clone();
    silu_backward(&mut dx, &r, &x);
    let r64 = to_f64(&r);
    let num = finite_difference(|x| weighted_sum(&x.iter().map(|&v| silu64(v)).collect::<Vec<_>>(), &r64), &x64);
    let want: Vec<f64> = num.iter().zip(&prior).map(|(n, &p)| n + f64::from(p)).collect();
    assert_close("dx", &dx, &want, 1e-5);
}

#[test]
fn swiglu_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = 40;
    let h1 = random(&mut rng, n, 5.0);
    let h3 = random(&mut rng, n, 2.0);
    let mut gate = vec![f32::NAN; n];
    swiglu_forward(&mut gate, &h1, &h3);
    let (a64, b64) = (to_f64(&h1), to_f64(&h3));
    let reference = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(&a, &b)| silu64(a) * b).collect::<Vec<_>>();
    assert_close("gate", &gate, &reference(&a64, &b64), 1e-6);

    let r = random(&mut rng, n, 1.0);
    let (p1, p3) = (random(&mut rng, n, 1.0), random(&mut rng, n, 1.0));
    let (mut dh1, mut dh3) = (p1.clone(), p3.clone());
    swiglu_backward(&mut dh1, &mut dh3, &r, &h1, &h3);
    let r64 = to_f64(&r);
    let n1 = finite_difference(|a| weighted_sum(&reference(a, &b64), &r64), &a64);
    let n3 = finite_difference(|b| weighted_sum(&reference(&a64, b), &r64), &b64);
    let add = |n: Vec<f64>, p: &[f32]| n.iter().zip(p).map(|(n, &p)| n + f64::from(p)).collect::<Vec<_>>();
    assert_close("dh1", &dh1, &add(n1, &p1), 1e-5);
    assert_close("dh3", &dh3, &add(n3, &p3), 1e-5);
}

// ---------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------

/// llama2.c's RoPE loop (run.c, `forward`), on one position's row-major vector of
/// `n_heads · head_size` values, in f64.
fn rope_llama2c(vec: &mut [f64], pos: usize, head_size: usize, theta: f64) {
    for i in (0..vec.len()).step_by(2) {
        let head_dim = i % head_size;
        let freq = 1.0 / theta.powf(head_dim as f64 / head_size as f64);
        let val = pos as f64 * freq;
        let (fcr, fci) = (val.cos(), val.sin());
        let (v0, v1) = (vec[i], vec[i + 1]);
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
    }
}

/// RoPE on channel-major `[n_heads·head_size, T]` with T = batch × seq, via the llama2.c loop.
fn rope_reference(x: &[f64], t_len: usize, seq: usize, head_size: usize, theta: f64) -> Vec<f64> {
    let channels = x.len() / t_len;
    let mut out = vec![0.0; x.len()];
    for t in 0..t_len {
        let mut vec: Vec<f64> = (0..channels).map(|c| x[c * t_len + t]).collect();
        rope_llama2c(&mut vec, t % seq, head_size, theta);
        for c in 0..channels {
            out[c * t_len + t] = vec[c];
        }
    }
    out
}

#[test]
fn rope_forward_matches_llama2c_and_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (theta, n_heads, head_dim, seq, batch) in [(10000.0f32, 3, 8, 5, 2), (500000.0, 2, 6, 7, 1)] {
        let t_len = batch * seq;
        let table = RopeTable::new(head_dim, seq, theta);
        let x = random(&mut rng, n_heads * head_dim * t_len, 1.0);
        let mut y = x.clone();
        rope_forward(&mut y, t_len, &table);
        let x64 = to_f64(&x);
        let th = f64::from(theta);
        assert_close("rope", &y, &rope_reference(&x64, t_len, seq, head_dim, th), 1e-6);

        let r = random(&mut rng, x.len(), 1.0);
        let mut dx = r.clone();
        rope_backward(&mut dx, t_len, &table);
        let r64 = to_f64(&r);
        let num = finite_difference(|x| weighted_sum(&rope_reference(x, t_len, seq, head_dim, th), &r64), &x64);
        assert_close("drope", &dx, &num, 1e-5);
    }
}

#[test]
fn rope_at_position_zero_is_identity_and_later_positions_rotate() {
    let table = RopeTable::new(4, 3, 10000.0);
    // One head of 4 channels, T = 3 positions; every pair starts at (1, 0).
    let mut x = vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0];
    rope_forward(&mut x, 3, &table);
    // pair 0 turns by pos radians; pair 1 by pos / 100.
    let want = [
        1.0,
        1f64.cos(),
        2f64.cos(),
        0.0,
        1f64.sin(),
        2f64.sin(),
        1.0,
        0.01f64.cos(),
        0.02f64.cos(),
        0.0,
        0.01f64.sin(),
        0.02f64.sin(),
    ];
    assert_close("rotated", &x, &want, 1e-6);
}
