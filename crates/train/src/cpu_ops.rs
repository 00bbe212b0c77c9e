//! The layers of a Llama step that run on the CPU, each forward beside its backward.
//!
//! Conventions, shared by every function here:
//! - Activations are **channel-major** `[C, T]`, as on the device surfaces `[1, C, 1, S]`:
//!   element `(c, t)` is at `c * T + t`. `T` is every token of the batch flattened
//!   (`batch × seq`), so the position of column `t` inside its sequence is `t % seq`.
//! - Weights keep llama2.c's row-major layouts: the embedding table and the classifier are
//!   `[vocab, dim]`.
//! - Forward functions *overwrite* their outputs. Backward functions *accumulate* (`+=`)
//!   into every gradient, activation and parameter alike, as in llm.c: one rule, gradients
//!   are zeroed once per step by the caller, and a residual branch adds its gradient for
//!   free. The one exception is RoPE, a rotation, whose backward rotates in place.
//! - No function allocates: outputs and scratch are the caller's buffers, sized once.
//!   The classifier keeps its one large buffer in a [`ClassifierLoss`] made once.
//! - Loops run over contiguous rows of `T` positions so they vectorise; reductions over
//!   channels (RMSNorm) walk tiles of columns; work is split over rayon's pool, and each
//!   task runs in [`device::cpu::simd`]'s AVX2 context (on SSE2, the x86-64 baseline,
//!   the cross-entropy's softmax took twice as long).
//!
//! # Panics
//! Every function panics when buffer lengths disagree with the stated shapes: those are
//! programming errors in the caller. Bad *user data* (a token id out of range) is caught
//! earlier, with a file and an offset, by [`crate::data`].

use device::cpu::simd;
use rayon::prelude::*;

use crate::data::{loss_tokens, IGNORE_TARGET};
use crate::linalg::{add_assign, matmul, matmul_acc, MatMut, MatRef};

/// Columns (positions) handled together when reducing over channels: the running sums
/// live in a stack array of this many lanes. 64 f32 = 4 cache lines.
const COLUMN_TILE: usize = 64;

/// Channels of the embedding handled by one task: a 512-byte stretch of each table
/// row, read sequentially (the prefetcher follows), and 128 rows of `x` whose current
/// cache lines (8 KB) stay in L1 while consecutive tokens fill them.
const EMBED_CHANNEL_BLOCK: usize = 128;

/// Elements per rayon task in elementwise ops: large enough that task overhead (a few
/// microseconds) is noise, small enough to split a 768×256 tensor over 2+ cores.
const ELEMENTWISE_CHUNK: usize = 16 * 1024;

/// Independent accumulators in horizontal reductions, so the compiler can keep them in
/// SIMD registers (floating-point sums are not reassociated otherwise).
const LANES: usize = 16;

// ---------------------------------------------------------------------------------------
// Vectorisable exp
// ---------------------------------------------------------------------------------------

/// `e^x` in f32, written with plain arithmetic and bit casts so loops over it vectorise
/// (the libm `expf` call does not; the cross-entropy alone needs `vocab × T` of them).
///
/// Cephes' `expf` method: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for
/// `e^r`, then `2^n` built in the exponent bits. Relative error ≲ 2 ulp over the clamped
/// range. Inputs are clamped to `[-87.3, 88.3]` so `2^n` stays a normal float (results
/// below `e^-87.3 ≈ 1.2e-38` come out as that, harmless in a softmax); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and a remainder (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    const LO: f32 = -87.3;
    const HI: f32 = 88.3;
    // `clamp` (unlike `max`/`min`) lets NaN through unchanged.
    let x = x.clamp(LO, HI);
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r2 + r + 1.0;
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    e_r * two_n
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Largest element (NaN elements are skipped here; they resurface through `exp`).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    max
}

/// Replaces each `x[i]` by `e^(x[i] - shift)` and returns their sum.
#[inline(always)]
fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *v = exp_f32(*v - shift);
            *lane += *v;
        }
    }
    let mut sum: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - shift);
        sum += *v;
    }
    sum + lanes.iter().sum::<f32>()
}

// ---------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------

/// Looks tokens up in the embedding table.
///
/// `x: [D, T]` (written) ← `table: [V, D]` rows `tokens: [T]`.
pub fn embedding_forward(x: &mut [f32], table: &[f32], tokens: &[u32], dim: usize) {
    let t_len = tokens.len();
    assert_eq!(x.len(), dim * t_len, "x must be [dim={dim}, T={t_len}]");
    check_tokens(table.len(), tokens, dim);
    if t_len == 0 {
        return;
    }
    // Each task owns a block of channel rows of x and copies, token by token, that
    // stretch of the token's table row into one column. Consecutive tokens write
    // neighbouring elements, so each row's current cache line stays hot.
    x.par_chunks_mut(EMBED_CHANNEL_BLOCK * t_len).enumerate().for_each(|(block, x_block)| {
        let d0 = block * EMBED_CHANNEL_BLOCK;
        let rows = x_block.len() / t_len;
        for (t, &token) in tokens.iter().enumerate() {
            let src = &table[token as usize * dim + d0..][..rows];
            for (r, &value) in src.iter().enumerate() {
                x_block[r * t_len + t] = value;
            }
        }
    });
}

/// Scatter-adds the gradient of the looked-up rows into the table's gradient.
///
/// `dtable: [V, D]` += `dx: [D, T]` column `t` into row `tokens[t]`. Tasks own disjoint
/// ranges of vocabulary rows (repeated tokens add into the same row, so rows cannot be
/// split by position); each walks all positions and takes the tokens in its range.
pub fn embedding_backward(dtable: &mut [f32], dx: &[f32], tokens: &[u32], dim: usize) {
    let t_len = tokens.len();
    assert_eq!(dx.len(), dim * t_len, "dx must be [dim={dim}, T={t_len}]");
    let vocab = check_tokens(dtable.len(), tokens, dim);
    if t_len == 0 || vocab == 0 {
        return;
    }
    let tasks = 4 * rayon::current_num_threads();
    let rows_per_task = vocab.div_ceil(tasks);
    dtable.par_chunks_mut(rows_per_task * dim).enumerate().for_each(|(task, rows)| {
        let first = task * rows_per_task;
        let owned = first..first + rows.len() / dim;
        for (t, &token) in tokens.iter().enumerate() {
            if !owned.contains(&(token as usize)) {
                continue;
            }
            let dst = &mut rows[(token as usize - first) * dim..][..dim];
            for (d, value) in dst.iter_mut().enumerate() {
                *value += dx[d * t_len + t];
            }
        }
    });
}

/// Checks a `[V, dim]` table's length and the tokens against `V`; returns `V`.
fn check_tokens(table_len: usize, tokens: &[u32], dim: usize) -> usize {
    assert!(dim > 0 && table_len.is_multiple_of(dim), "table length {table_len} is not a multiple of dim={dim}");
    let vocab = table_len / dim;
    if let Some((t, &token)) = tokens.iter().enumerate().find(|(_, &token)| token as usize >= vocab) {
        panic!("token {token} at position {t} is outside the vocabulary of {vocab}");
    }
    vocab
}

// ---------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------

/// RMSNorm over the channels of each position:
/// `y[c, t] = x[c, t] · w[c] / sqrt(mean_c x[·, t]² + eps)`.
///
/// `y, x: [C, T]`, `weight: [C]`; also writes `inv_rms: [T]` (`1/sqrt(mean x² + eps)` per
/// position), which the backward needs.
pub fn rmsnorm_forward(y: &mut [f32], inv_rms: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let channels = weight.len();
    let t_len = inv_rms.len();
    assert_eq!(x.len(), channels * t_len, "x must be [C={channels}, T={t_len}]");
    assert_eq!(y.len(), x.len(), "y must be shaped like x");
    if t_len == 0 {
        return;
    }
    // Pass 1, over tiles of columns: sum of squares down the channels.
    inv_rms.par_chunks_mut(COLUMN_TILE).enumerate().for_each(|(tile, inv)| {
        simd(
            #[inline(always)]
            || {
                let t0 = tile * COLUMN_TILE;
                let mut sum_sq = [0.0f32; COLUMN_TILE];
                let sum_sq = &mut sum_sq[..inv.len()];
                for row in x.chunks_exact(t_len) {
                    for (acc, &v) in sum_sq.iter_mut().zip(&row[t0..]) {
                        *acc += v * v;
                    }
                }
                for (inv, &ss) in inv.iter_mut().zip(sum_sq.iter()) {
                    *inv = 1.0 / (ss / channels as f32 + eps).sqrt();
                }
            },
        )
    });
    // Pass 2, over rows: scale.
    let inv_rms = &*inv_rms;
    y.par_chunks_mut(t_len)
        .zip(x.par_chunks(t_len))
        .zip(weight.par_iter())
        .with_min_len(rows_per_task(t_len))
        .for_each(|((y_row, x_row), &w)| {
            simd(
                #[inline(always)]
                || {
                    for ((y, &x), &inv) in y_row.iter_mut().zip(x_row).zip(inv_rms) {
                        *y = x * inv * w;
                    }
                },
            )
        });
}

/// Backward of [`rmsnorm_forward`]. With `r = inv_rms[t]`:
/// `dx[c, t] += r·w[c]·dy[c, t] − x[c, t]·r³/C · Σ_c' dy[c', t]·w[c']·x[c', t]` and
/// `dweight[c] += Σ_t dy[c, t]·x[c, t]·r`.
///
/// `dx, dy, x: [C, T]`, `dweight, weight: [C]`, `inv_rms: [T]` from the forward,
/// `scratch: [T]` (overwritten).
#[allow(clippy::too_many_arguments)] // the gradients, the inputs, the saved statistic, a scratch row
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dweight: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    inv_rms: &[f32],
    scratch: &mut [f32],
) {
    let channels = weight.len();
    let t_len = inv_rms.len();
    assert_eq!(x.len(), channels * t_len, "x must be [C={channels}, T={t_len}]");
    assert_eq!(dy.len(), x.len(), "dy must be shaped like x");
    assert_eq!(dx.len(), x.len(), "dx must be shaped like x");
    assert_eq!(dweight.len(), channels, "dweight must be [C={channels}]");
    assert_eq!(scratch.len(), t_len, "scratch must be [T={t_len}]");
    if t_len == 0 {
        return;
    }
    // Pass 1, over tiles of columns: coef[t] = r³/C · Σ_c dy·w·x.
    scratch.par_chunks_mut(COLUMN_TILE).enumerate().for_each(|(tile, coef)| {
        simd(
            #[inline(always)]
            || {
                let t0 = tile * COLUMN_TILE;
                let mut dot = [0.0f32; COLUMN_TILE];
                let dot = &mut dot[..coef.len()];
                for ((dy_row, x_row), &w) in dy.chunks_exact(t_len).zip(x.chunks_exact(t_len)).zip(weight) {
                    for ((acc, &g), &v) in dot.iter_mut().zip(&dy_row[t0..]).zip(&x_row[t0..]) {
                        *acc += g * w * v;
                    }
                }
                for ((coef, &dot), &r) in coef.iter_mut().zip(dot.iter()).zip(&inv_rms[t0..]) {
                    *coef = r * r * r * dot / channels as f32;
                }
            },
        )
    });
    // Pass 2, over rows: dx and dweight.
    let coef = &*scratch;
    dx.par_chunks_mut(t_len)
        .zip(dweight.par_iter_mut())
        .zip(dy.par_chunks(t_len).zip(x.par_chunks(t_len)).zip(weight.par_iter()))
        .with_min_len(rows_per_task(t_len))
        .for_each(|((dx_row, dw), ((dy_row, x_row), &w))| {
            simd(
                #[inline(always)]
                || {
                    for (((dx, &g), &v), (&r, &coef)) in
                        dx_row.iter_mut().zip(dy_row).zip(x_row).zip(inv_rms.iter().zip(coef))
                    {
                        *dx += r * w * g - v * coef;
                    }
                    *dw += dot3(dy_row, x_row, inv_rms);
                },
            )
        });
}

/// `Σ a[i]·b[i]·c[i]` with independent lanes so it vectorises.
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks, c_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let mut tail = 0.0f32;
    for ((&a, &b), &c) in a_chunks.remainder().iter().zip(b_chunks.remainder()).zip(c_chunks.remainder()) {
        tail += a * b * c;
    }
    for ((a, b), c) in a_chunks.zip(b_chunks).zip(c_chunks) {
        for (lane, ((&a, &b), &c)) in lanes.iter_mut().zip(a.iter().zip(b).zip(c)) {
            *lane += a * b * c;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Rows of `t_len` elements per rayon task so that a task holds ~`ELEMENTWISE_CHUNK`.
fn rows_per_task(t_len: usize) -> usize {
    (ELEMENTWISE_CHUNK / t_len.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------
// Classifier + cross-entropy
// ---------------------------------------------------------------------------------------

/// Positions whose logits are held at once by the training pipelines: `[512, 32000]`
/// f32 is 66 MB, where all of `T = 2048` would be 262 MB. Measured with
/// `examples/classifier_bench` (2 threads, gradients transposed), in ms for the forward
/// and backward: Stories15M's classifier (`[32000, 288]`, T = 2048) 808–889 with chunks
/// of 128–256, 651–705 with 512, 690–758 with 1024, 648–746 with 2048; Stories110M's
/// (`[32000, 768]`, T = 1024) 834–881 with 512, 860–908 with 1024. Small chunks give the
/// GEMMs a short inner dimension; large ones hold more logits than the caches.
pub const DEFAULT_CLASSIFIER_CHUNK: usize = 512;

/// Softmax cross-entropy over rows of logits, turning them into their gradient.
///
/// `logits: [N, V]` row-major, one row per position (so the softmax runs over contiguous
/// memory), `targets: [N]`. Returns the *sum* over rows of `−log softmax(row)[target]`,
/// in f64. Each row is replaced by `grad_scale · (softmax(row) − onehot(target))`.
/// A row whose target is [`IGNORE_TARGET`] (masked out) adds nothing to the sum and
/// its gradient row is zero.
///
/// # Panics
/// If a target other than [`IGNORE_TARGET`] is `≥ V`, or the lengths disagree.
pub fn softmax_cross_entropy_rows(logits: &mut [f32], targets: &[u32], vocab: usize, grad_scale: f32) -> f64 {
    assert_eq!(logits.len(), targets.len() * vocab, "logits must be [N={}, V={vocab}]", targets.len());
    cross_entropy_rows(logits, targets, vocab, Some(grad_scale))
}

/// The summed cross-entropy of rows of logits, each row left as `e^(l − max)`, or, with
/// `grad_scale`, turned into its gradient (see [`softmax_cross_entropy_rows`]).
fn cross_entropy_rows(logits: &mut [f32], targets: &[u32], vocab: usize, grad_scale: Option<f32>) -> f64 {
    if let Some(&target) = targets.iter().find(|&&target| target as usize >= vocab && target != IGNORE_TARGET) {
        panic!("target {target} is outside the vocabulary of {vocab}");
    }
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            if target == IGNORE_TARGET {
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                return 0.0;
            }
            simd(
                #[inline(always)]
                || {
                    let target = target as usize;
                    let target_logit = row[target];
                    let max = max_of(row);
                    let sum = exp_shifted_in_place(row, max);
                    if let Some(grad_scale) = grad_scale {
                        let scale = grad_scale / sum;
                        for p in row.iter_mut() {
                            *p *= scale;
                        }
                        row[target] -= grad_scale;
                    }
                    // −log p[target] = log Σ e^(l − max) + max − l[target]
                    f64::from(sum).ln() + f64::from(max) - f64::from(target_logit)
                },
            )
        })
        .sum()
}

/// The classifier `logits = Wcls · x` followed by the mean cross-entropy over the full
/// vocabulary, forward and backward.
///
/// Why forward and backward are one call: the logits of a whole batch (`[32000, 2048]`,
/// 262 MB) are never needed at once. Positions are processed in chunks; each chunk's
/// logits become its `dlogits` in place, which feed the two gradient GEMMs right away.
/// [`ClassifierLoss::forward`] is the loss alone, for evaluation.
#[derive(Debug)]
pub struct ClassifierLoss {
    vocab: usize,
    dim: usize,
    chunk: usize,
    /// `[chunk, V]`: one chunk's logits, transposed so each position's row is contiguous.
    logits: Vec<f32>,
    /// Whether [`ClassifierLoss::forward_backward`] computes the gradients transposed.
    transposed: bool,
    /// `[chunk, D]`: one chunk's `dx`, transposed (when `transposed`).
    dxt: Vec<f32>,
    /// `[D, V]`: `dWcls` transposed, summed over the chunks (when `transposed`; allocated
    /// by the first backward: evaluation never needs it).
    dwt: Vec<f32>,
}

/// Widths below which the classifier's gradients are computed transposed (see
/// [`ClassifierLoss::forward_backward`]). Measured with `examples/classifier_bench`
/// (2 threads, chunks of 512, medians of 3 runs in turn, ms per forward + backward): at
/// Stories15M's width (288, T = 2048) 644–682 transposed against 726–806; at
/// Stories110M's (768, T = 1024) within ±8 % either way from run to run, while the
/// transposed `dWcls` buffer costs `dim × vocab` floats more (98 MB there, 545 MB for
/// Qwen2.5-0.5B's 896 × 151936): not worth it.
pub const TRANSPOSED_GRADIENTS_BELOW_DIM: usize = 512;

impl ClassifierLoss {
    /// Buffers for a `[vocab, dim]` classifier, `chunk` positions at a time.
    pub fn new(vocab: usize, dim: usize, chunk: usize) -> ClassifierLoss {
        assert!(chunk > 0, "chunk must hold at least one position");
        ClassifierLoss {
            vocab,
            dim,
            chunk,
            logits: vec![0.0; chunk * vocab],
            transposed: false,
            dxt: Vec::new(),
            dwt: Vec::new(),
        }
        .with_transposed_gradients(dim < TRANSPOSED_GRADIENTS_BELOW_DIM)
    }

    /// Chooses the orientation of the gradient products (by default transposed below
    /// [`TRANSPOSED_GRADIENTS_BELOW_DIM`]). Both give the same gradients up to f32
    /// rounding.
    pub fn with_transposed_gradients(mut self, transposed: bool) -> ClassifierLoss {
        self.transposed = transposed;
        self.dxt = if transposed { vec![0.0; self.chunk * self.dim] } else { Vec::new() };
        self.dwt = Vec::new();
        self
    }

    /// Mean cross-entropy of `Wcls · x` against `targets`, over the targets that are
    /// not [`IGNORE_TARGET`] (0 when there are none).
    ///
    /// `x: [D, T]`, `wcls: [V, D]`, `targets: [T]`.
    pub fn forward(&mut self, x: &[f32], wcls: &[f32], targets: &[u32]) -> f32 {
        let t_len = self.check_shapes(x, wcls, targets);
        let vocab = self.vocab;
        let mut loss_sum = 0.0f64;
        for t0 in (0..t_len).step_by(self.chunk) {
            let n = self.chunk.min(t_len - t0);
            let logits = chunk_logits(&mut self.logits, x, wcls, (t0, n, t_len));
            loss_sum += cross_entropy_rows(logits, &targets[t0..t0 + n], vocab, None);
        }
        (loss_sum / loss_tokens(targets).max(1) as f64) as f32
    }

    /// Mean cross-entropy, and the gradients of `grad_scale × mean loss`:
    /// `dx: [D, T] += Wclsᵀ · dlogits` and `dwcls: [V, D] += dlogits · xᵀ`, where
    /// `dlogits = grad_scale · (softmax − onehot) / N` for the `N` targets that are not
    /// [`IGNORE_TARGET`] (`N = T` without a mask) and 0 for the others.
    ///
    /// `grad_scale` carries the loss scale of fp16 training and `1 / accumulation_steps`
    /// when micro-batches are accumulated. Returns the unscaled mean loss.
    ///
    /// Below [`TRANSPOSED_GRADIENTS_BELOW_DIM`] both gradients are computed transposed —
    /// `dxᵀ [n, D] = dlogits · Wcls` per chunk and `dWclsᵀ [D, V] += x · dlogitsᵀ` over
    /// the chunks — and added into `dx` and `dwcls` transposed: in that orientation every
    /// operand has the summed dimension contiguous, and at Stories15M's shape the gemm
    /// crate runs the two products at 187–196 GFLOP/s against 141–154 the other way round.
    pub fn forward_backward(
        &mut self,
        x: &[f32],
        wcls: &[f32],
        targets: &[u32],
        grad_scale: f32,
        dx: &mut [f32],
        dwcls: &mut [f32],
    ) -> f32 {
        let t_len = self.check_shapes(x, wcls, targets);
        assert_eq!(dx.len(), x.len(), "dx must be shaped like x");
        assert_eq!(dwcls.len(), wcls.len(), "dwcls must be shaped like wcls");
        let (vocab, dim) = (self.vocab, self.dim);
        let row_scale = grad_scale / loss_tokens(targets).max(1) as f32;
        if self.transposed {
            self.dwt.resize(dim * vocab, 0.0);
        }
        let mut loss_sum = 0.0f64;
        for (c, t0) in (0..t_len).step_by(self.chunk).enumerate() {
            let n = self.chunk.min(t_len - t0);
            let dlogits = chunk_logits(&mut self.logits, x, wcls, (t0, n, t_len));
            loss_sum += softmax_cross_entropy_rows(dlogits, &targets[t0..t0 + n], vocab, row_scale);
            let dlogits = MatRef::new(dlogits, n, vocab); // [n, V]
            let w = MatRef::new(wcls, vocab, dim);
            let xc = MatRef::strided(&x[t0..], dim, n, t_len); // [D, n]
            let dxc = MatMut::strided(&mut dx[t0..], dim, n, t_len);
            if !self.transposed {
                // dx[:, t0..t0+n] += Wclsᵀ [D, V] · dlogitsᵀ [V, n]; dWcls += dlogitsᵀ · xᵀ
                matmul_acc(dxc, w.t(), dlogits.t());
                matmul_acc(MatMut::new(dwcls, vocab, dim), dlogits.t(), xc.t());
                continue;
            }
            // dx[:, t0..t0+n] += (dlogits [n, V] · Wcls [V, D])ᵀ
            let dxt = &mut self.dxt[..n * dim];
            matmul(MatMut::new(dxt, n, dim), dlogits, w);
            add_assign(dxc, MatRef::new(dxt, n, dim).t());
            // dWclsᵀ [D, V] (+)= x[:, t0..t0+n] [D, n] · dlogits [n, V]
            let dwt = MatMut::new(&mut self.dwt, dim, vocab);
            if c == 0 {
                matmul(dwt, xc, dlogits);
            } else {
                matmul_acc(dwt, xc, dlogits);
            }
        }
        if self.transposed && t_len > 0 {
            add_assign(MatMut::new(dwcls, vocab, dim), MatRef::new(&self.dwt, dim, vocab).t());
        }
        (loss_sum / loss_tokens(targets).max(1) as f64) as f32
    }

    /// As [`ClassifierLoss::forward_backward`] for a frozen classifier: the mean
    /// cross-entropy and `dx [D, T] += Wclsᵀ · dlogits` only, without `dWcls` (one of the
    /// step's largest GEMMs, which LoRA fine-tuning does not need).
    pub fn forward_backward_input(
        &mut self,
        x: &[f32],
        wcls: &[f32],
        targets: &[u32],
        grad_scale: f32,
        dx: &mut [f32],
    ) -> f32 {
        let t_len = self.check_shapes(x, wcls, targets);
        assert_eq!(dx.len(), x.len(), "dx must be shaped like x");
        let (vocab, dim) = (self.vocab, self.dim);
        let row_scale = grad_scale / loss_tokens(targets).max(1) as f32;
        let mut loss_sum = 0.0f64;
        for t0 in (0..t_len).step_by(self.chunk) {
            let n = self.chunk.min(t_len - t0);
            let dlogits = chunk_logits(&mut self.logits, x, wcls, (t0, n, t_len));
            loss_sum += softmax_cross_entropy_rows(dlogits, &targets[t0..t0 + n], vocab, row_scale);
            let dlogits = MatRef::new(dlogits, n, vocab); // [n, V]
            let w = MatRef::new(wcls, vocab, dim);
            let dxc = MatMut::strided(&mut dx[t0..], dim, n, t_len);
            // dx[:, t0..t0+n] += Wclsᵀ [D, V] · dlogitsᵀ [V, n]
            matmul_acc(dxc, w.t(), dlogits.t());
        }
        (loss_sum / loss_tokens(targets).max(1) as f64) as f32
    }

    /// Checks the operands and returns `T`.
    fn check_shapes(&self, x: &[f32], wcls: &[f32], targets: &[u32]) -> usize {
        let t_len = targets.len();
        assert_eq!(x.len(), self.dim * t_len, "x must be [D={}, T={t_len}]", self.dim);
        assert_eq!(wcls.len(), self.vocab * self.dim, "wcls must be [V={}, D={}]", self.vocab, self.dim);
        t_len
    }
}

/// Logits of positions `t0..t0+n` of `x: [D, T]`, as `[n, V]` rows in `logits`:
/// `xᵀ [n, D] · Wclsᵀ [D, V]`.
fn chunk_logits<'a>(
    logits: &'a mut [f32],
    x: &[f32],
    wcls: &[f32],
    (t0, n, t_len): (usize, usize, usize),
) -> &'a mut [f32] {
    let dim = x.len() / t_len;
    let vocab = wcls.len() / dim.max(1);
    let logits = &mut logits[..n * vocab];
    matmul(
        MatMut::new(logits, n, vocab),
        MatRef::strided(&x[t0..], dim, n, t_len).t(),
        MatRef::new(wcls, vocab, dim).t(),
    );
    logits
}

// ---------------------------------------------------------------------------------------
// SiLU and the SwiGLU gate
// ---------------------------------------------------------------------------------------

/// `y = x · sigmoid(x)`, elementwise (any shape).
pub fn silu_forward(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "y must be shaped like x");
    y.par_chunks_mut(ELEMENTWISE_CHUNK).zip(x.par_chunks(ELEMENTWISE_CHUNK)).for_each(|(y, x)| {
        simd(
            #[inline(always)]
            || {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * sigmoid(x);
                }
            },
        )
    });
}

/// `dx += dy · silu'(x)` with `silu'(x) = s·(1 + x·(1 − s))`, `s = sigmoid(x)`.
pub fn silu_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    assert_eq!(dx.len(), x.len(), "dx must be shaped like x");
    assert_eq!(dy.len(), x.len(), "dy must be shaped like x");
    dx.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(dy.par_chunks(ELEMENTWISE_CHUNK).zip(x.par_chunks(ELEMENTWISE_CHUNK)))
        .for_each(|(dx, (dy, x))| {
            simd(
                #[inline(always)]
                || {
                    for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
                        let s = sigmoid(x);
                        *dx += dy * s * (1.0 + x * (1.0 - s));
                    }
                },
            )
        });
}

/// The SwiGLU gate of the feed-forward block: `gate = silu(h1) · h3`, with
/// `h1 = W1·x`, `h3 = W3·x` (all `[hidden, T]`, elementwise).
pub fn swiglu_forward(gate: &mut [f32], h1: &[f32], h3: &[f32]) {
    assert_eq!(h1.len(), h3.len(), "h1 and h3 must have the same shape");
    assert_eq!(gate.len(), h1.len(), "gate must be shaped like h1");
    gate.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(h1.par_chunks(ELEMENTWISE_CHUNK).zip(h3.par_chunks(ELEMENTWISE_CHUNK)))
        .for_each(|(gate, (h1, h3))| {
            simd(
                #[inline(always)]
                || {
                    for ((g, &a), &b) in gate.iter_mut().zip(h1).zip(h3) {
                        *g = a * sigmoid(a) * b;
                    }
                },
            )
        });
}

/// Backward of [`swiglu_forward`]: `dh1 += dgate · h3 · silu'(h1)`, `dh3 += dgate · silu(h1)`.
pub fn swiglu_backward(dh1: &mut [f32], dh3: &mut [f32], dgate: &[f32], h1: &[f32], h3: &[f32]) {
    let n = h1.len();
    assert_eq!(h3.len(), n, "h3 must be shaped like h1");
    assert_eq!(dgate.len(), n, "dgate must be shaped like h1");
    assert_eq!(dh1.len(), n, "dh1 must be shaped like h1");
    assert_eq!(dh3.len(), n, "dh3 must be shaped like h1");
    let c = ELEMENTWISE_CHUNK;
    dh1.par_chunks_mut(c)
        .zip(dh3.par_chunks_mut(c))
        .zip(dgate.par_chunks(c).zip(h1.par_chunks(c)).zip(h3.par_chunks(c)))
        .for_each(|((dh1, dh3), ((dgate, h1), h3))| {
            simd(
                #[inline(always)]
                || {
                    for i in 0..dh1.len() {
                        let (a, b, g) = (h1[i], h3[i], dgate[i]);
                        let s = sigmoid(a);
                        let silu = a * s;
                        dh1[i] += g * b * s * (1.0 + a * (1.0 - s));
                        dh3[i] += g * silu;
                    }
                },
            )
        });
}

// ---------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------

/// Cosines and sines of the rotary position embedding, computed once per run.
///
/// Pair `i` of a head (channels `2i`, `2i+1`) at position `p` turns by
/// `p · θ^(−2i/head_dim)`, as in llama2.c. Stored `[head_dim/2, seq]` so the inner loop
/// over positions reads contiguous memory.
#[derive(Clone, Debug)]
pub struct RopeTable {
    head_dim: usize,
    seq: usize,
    /// `[head_dim/2, seq]`
    cos: Vec<f32>,
    /// `[head_dim/2, seq]`
    sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for heads of `head_dim` channels (even) and positions `0..seq`.
    ///
    /// # Panics
    /// If `head_dim` is odd or zero, or `seq` is zero.
    pub fn new(head_dim: usize, seq: usize, theta: f32) -> RopeTable {
        RopeTable::with_scaling(head_dim, seq, theta, None)
    }

    /// Tables for `config`'s heads and RoPE frequencies (θ and any scaling).
    pub fn for_config(config: &llama::Config, seq: usize) -> RopeTable {
        RopeTable::with_scaling(config.head_dim(), seq, config.rope_theta, config.rope_scaling)
    }

    fn with_scaling(head_dim: usize, seq: usize, theta: f32, scaling: Option<llama::RopeScaling>) -> RopeTable {
        assert!(head_dim > 0 && head_dim.is_multiple_of(2), "head_dim must be even and positive, got {head_dim}");
        assert!(seq > 0, "seq must be positive");
        let pairs = head_dim / 2;
        let mut cos = Vec::with_capacity(pairs * seq);
        let mut sin = Vec::with_capacity(pairs * seq);
        for i in 0..pairs {
            // f64 so large positions keep their precision before the final rounding.
            let freq = 1.0 / f64::from(theta).powf((2 * i) as f64 / head_dim as f64);
            let freq = scaling.map_or(freq, |s| s.apply(freq));
            for pos in 0..seq {
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { head_dim, seq, cos, sin }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Rotates every pair of `x: [n_heads·head_dim, T]` by `sign × angle(pair, t % seq)`.
    fn rotate(&self, x: &mut [f32], t_len: usize, sign: f32) {
        let pairs = self.head_dim / 2;
        assert!(
            t_len > 0 && x.len().is_multiple_of(self.head_dim * t_len),
            "x must be [n_heads·head_dim, T={t_len}] with head_dim={}, got {} elements",
            self.head_dim,
            x.len()
        );
        let seq = self.seq;
        x.par_chunks_mut(2 * t_len).enumerate().for_each(|(pair_row, rows)| {
            simd(
                #[inline(always)]
                || {
                    let i = pair_row % pairs;
                    let (even, odd) = rows.split_at_mut(t_len);
                    let cos = &self.cos[i * seq..(i + 1) * seq];
                    let sin = &self.sin[i * seq..(i + 1) * seq];
                    for (even, odd) in even.chunks_mut(seq).zip(odd.chunks_mut(seq)) {
                        for (((x0, x1), &c), &s) in even.iter_mut().zip(odd.iter_mut()).zip(cos).zip(sin) {
                            let s = sign * s;
                            let (a, b) = (*x0, *x1);
                            *x0 = a * c - b * s;
                            *x1 = a * s + b * c;
                        }
                    }
                },
            )
        });
    }
}

/// Applies RoPE in place to queries or keys `x: [n_heads·head_dim, T]`, column `t`
/// being position `t % seq`: each pair `(x[2i], x[2i+1])` of each head turns by its angle.
pub fn rope_forward(x: &mut [f32], t_len: usize, table: &RopeTable) {
    table.rotate(x, t_len, 1.0);
}

/// Backward of [`rope_forward`], in place: a rotation's transpose is the rotation by the
/// opposite angle, so `dx` (holding the gradient of the rotated values) becomes the
/// gradient of the unrotated ones.
pub fn rope_backward(dx: &mut [f32], t_len: usize, table: &RopeTable) {
    table.rotate(dx, t_len, -1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f64::from(f32::EPSILON), "worst relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1.3e-38);
        assert!(exp_f32(1000.0).is_finite());
    }

    #[test]
    fn max_and_exp_sum_agree_with_plain_loops() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 * 0.1 - 3.0).collect();
        let plain_max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_of(&x), plain_max);
        let mut y = x.clone();
        let sum = exp_shifted_in_place(&mut y, plain_max);
        let plain: f64 = x.iter().map(|&v| f64::from(v - plain_max).exp()).sum();
        assert!((f64::from(sum) - plain).abs() < 1e-5 * plain);
    }
}
