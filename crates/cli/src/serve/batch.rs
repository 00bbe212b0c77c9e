//! The batched forward pass of `anetrain serve`: any number of token rows, each from its
//! own sequence at its own position, through the model at once.
//!
//! Every projection, the FFN and the classifier are one GEMM over all rows,
//! `Y [R, out] = X [R, in] · Wᵀ`, with the weights stored transposed (`Wᵀ [in, out]`)
//! so that a row of `Wᵀ` is loaded once per step and used by every row of X: with R
//! rows a step reads the weights once where R single-token steps read them R times.
//! Attention runs per row over its own sequence's KV cache.
//!
//! ## Bit-identical results, whatever the batch
//! Each output element is summed over `k = 0, 1, …, in-1` left to right in f32,
//! starting from 0, one multiply and one add per term (Rust never fuses them), exactly
//! as llama2.c's `matmul` and [`llama::reference::matmul`] do. The kernel tiles rows and
//! columns (and vectorizes across columns), but no tiling changes the order in which
//! one element's terms are added, so a row's result does not depend on which other
//! rows share the step, nor on how many there are. The rest (RMSNorm, RoPE, attention,
//! SiLU) uses the reference's own functions or its exact expressions, per row. So
//! a sequence's logits are those of [`llama::reference::forward`], bit for bit — alone,
//! batched with 31 others, prefilled in chunks of any size or reusing a cached prefix.

use llama::reference::{rmsnorm, rope};
use llama::Params;
use rayon::prelude::*;

/// A matrix stored transposed, `Wᵀ [inp, out]` for the model's `W [out, inp]`, cut into
/// panels of [`COLS`] columns, each panel contiguous (`[inp, COLS]`, the last one
/// `[inp, out % COLS]`): a tile walks its panel's memory in order (a plain `[inp, out]`
/// layout would jump a whole row — 128 KB for a 32000-token classifier — per k).
pub struct Transposed {
    panels: Vec<f32>,
    inp: usize,
    out: usize,
}

impl Transposed {
    pub fn new(w: &[f32], out: usize, inp: usize) -> Transposed {
        assert_eq!(w.len(), out * inp, "W must be [{out}, {inp}]");
        let mut panels = vec![0.0f32; w.len()];
        for o0 in (0..out).step_by(COLS) {
            let width = COLS.min(out - o0);
            let panel = &mut panels[o0 * inp..(o0 + width) * inp];
            for j in 0..width {
                let row = &w[(o0 + j) * inp..(o0 + j + 1) * inp];
                for (k, &v) in row.iter().enumerate() {
                    panel[k * width + j] = v;
                }
            }
        }
        Transposed { panels, inp, out }
    }

    /// `y [rows, out] = x [rows, inp] · Wᵀ`, each element summed over k in order.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (inp, out) = (self.inp, self.out);
        assert_eq!(x.len(), rows * inp);
        assert_eq!(y.len(), rows * out);
        // Columns per task: enough tasks for the threads, each a multiple of the panel.
        let threads = rayon::current_num_threads().max(1);
        let per = out.div_ceil(threads * 4).div_ceil(COLS) * COLS;
        let per = per.max(COLS);
        let blocks: Vec<(usize, Vec<f32>)> = (0..out)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|o0| {
                let width = per.min(out - o0);
                let mut local = vec![0.0f32; rows * width];
                gemm_block(&self.panels, inp, x, rows, o0, width, &mut local);
                (o0, local)
            })
            .collect();
        for (o0, local) in blocks {
            let width = local.len() / rows.max(1);
            for r in 0..rows {
                y[r * out + o0..r * out + o0 + width].copy_from_slice(&local[r * width..(r + 1) * width]);
            }
        }
    }
}

/// Output columns per register tile (and per panel).
const COLS: usize = 16;
/// Rows per register tile.
const ROWS: usize = 6;

/// `local [rows, width] = x [rows, inp] · Wᵀ[:, o0..o0+width]` (`o0` a multiple of COLS).
fn gemm_block(panels: &[f32], inp: usize, x: &[f32], rows: usize, o0: usize, width: usize, local: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (checked just above); the function is otherwise safe.
            unsafe { gemm_block_avx(panels, inp, x, rows, o0, width, local) };
            return;
        }
    }
    gemm_block_generic(panels, inp, x, rows, o0, width, local);
}

/// The same code compiled with AVX's wider registers (AVX, not FMA: a fused
/// multiply-add would round differently from llama2.c's separate multiply and add).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn gemm_block_avx(
    panels: &[f32],
    inp: usize,
    x: &[f32],
    rows: usize,
    o0: usize,
    width: usize,
    local: &mut [f32],
) {
    let mut c = 0;
    while c + COLS <= width {
        let panel = &panels[(o0 + c) * inp..(o0 + c + COLS) * inp];
        let mut r = 0;
        while r + ROWS <= rows {
            tile_avx::<ROWS>(panel, inp, x, r, local, width, c);
            r += ROWS;
        }
        // The rows left, in the widest tiles that fit (more independent sums per k).
        while r < rows {
            match rows - r {
                4.. => {
                    tile_avx::<4>(panel, inp, x, r, local, width, c);
                    r += 4;
                }
                2 | 3 => {
                    tile_avx::<2>(panel, inp, x, r, local, width, c);
                    r += 2;
                }
                _ => {
                    tile_avx::<1>(panel, inp, x, r, local, width, c);
                    r += 1;
                }
            }
        }
        c += COLS;
    }
    if c < width {
        // The narrower last panel (the generic code, the same order of terms).
        tail_columns(panels, inp, x, rows, o0, c, width, local);
    }
}

/// [`tile`] with AVX intrinsics: 8 lanes of `acc + w·x`, a separate multiply and add
/// (`_mm256_mul_ps`, `_mm256_add_ps`), so each lane rounds exactly as the scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn tile_avx<const R: usize>(
    panel: &[f32],
    inp: usize,
    x: &[f32],
    r0: usize,
    local: &mut [f32],
    width: usize,
    c: usize,
) {
    use std::arch::x86_64::*;
    assert!(panel.len() >= inp * COLS && x.len() >= (r0 + R) * inp && local.len() >= (r0 + R - 1) * width + c + COLS);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let p = panel.as_ptr();
    let xp = x.as_ptr().add(r0 * inp);
    for k in 0..inp {
        // SAFETY: k < inp and the asserts above bound every pointer.
        let w0 = _mm256_loadu_ps(p.add(k * COLS));
        let w1 = _mm256_loadu_ps(p.add(k * COLS + 8));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_set1_ps(*xp.add(i * inp + k));
            a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(w0, xv));
            a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(w1, xv));
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let o = local.as_mut_ptr().add((r0 + i) * width + c);
        _mm256_storeu_ps(o, a[0]);
        _mm256_storeu_ps(o.add(8), a[1]);
    }
}

#[inline(always)]
fn gemm_block_generic(panels: &[f32], inp: usize, x: &[f32], rows: usize, o0: usize, width: usize, local: &mut [f32]) {
    let mut c = 0;
    while c + COLS <= width {
        let panel = &panels[(o0 + c) * inp..(o0 + c + COLS) * inp];
        let mut r = 0;
        while r + ROWS <= rows {
            tile::<ROWS>(panel, inp, x, r, local, width, c);
            r += ROWS;
        }
        while r < rows {
            tile::<1>(panel, inp, x, r, local, width, c);
            r += 1;
        }
        c += COLS;
    }
    tail_columns(panels, inp, x, rows, o0, c, width, local);
}

/// The last, narrower panel (columns `c..width` of the block): one column at a time,
/// the same order of terms.
#[allow(clippy::too_many_arguments)]
fn tail_columns(
    panels: &[f32],
    inp: usize,
    x: &[f32],
    rows: usize,
    o0: usize,
    c: usize,
    width: usize,
    local: &mut [f32],
) {
    let tail = width - c;
    if tail == 0 {
        return;
    }
    let panel = &panels[(o0 + c) * inp..(o0 + c + tail) * inp];
    for j in 0..tail {
        for r in 0..rows {
            let xr = &x[r * inp..(r + 1) * inp];
            let mut sum = 0.0f32;
            for (k, &xv) in xr.iter().enumerate() {
                sum += panel[k * tail + j] * xv;
            }
            local[r * width + c + j] = sum;
        }
    }
}

/// `R` rows × [`COLS`] columns of one panel: accumulators in registers, k in order.
#[inline(always)]
fn tile<const R: usize>(panel: &[f32], inp: usize, x: &[f32], r0: usize, local: &mut [f32], width: usize, c: usize) {
    let mut acc = [[0.0f32; COLS]; R];
    let xs: [&[f32]; R] = std::array::from_fn(|i| &x[(r0 + i) * inp..(r0 + i + 1) * inp]);
    for (k, w) in panel.chunks_exact(COLS).enumerate() {
        let w: &[f32; COLS] = w.try_into().expect("a full panel row");
        for i in 0..R {
            let xv = xs[i][k];
            for j in 0..COLS {
                acc[i][j] += w[j] * xv;
            }
        }
    }
    for i in 0..R {
        local[(r0 + i) * width + c..(r0 + i) * width + c + COLS].copy_from_slice(&acc[i]);
    }
}

/// One layer's matrices, transposed.
struct LayerT {
    wq: Transposed,
    wk: Transposed,
    wv: Transposed,
    wo: Transposed,
    w1: Transposed,
    w2: Transposed,
    w3: Transposed,
}

/// The model's weights laid out for batched steps.
pub struct BatchModel {
    pub params: Params,
    layers: Vec<LayerT>,
    wcls: Transposed,
}

/// Keys and values of one sequence, grown as positions are added: per layer
/// `[positions, kv_dim]`.
#[derive(Clone, Debug, Default)]
pub struct SeqKv {
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
}

impl SeqKv {
    pub fn new(n_layers: usize) -> SeqKv {
        SeqKv { keys: vec![Vec::new(); n_layers], values: vec![Vec::new(); n_layers] }
    }

    /// Positions held.
    pub fn len(&self, kv_dim: usize) -> usize {
        self.keys.first().map_or(0, |k| k.len() / kv_dim)
    }

    /// The first `n` positions of `self`, as a new cache.
    pub fn prefix(&self, n: usize, kv_dim: usize) -> SeqKv {
        SeqKv {
            keys: self.keys.iter().map(|k| k[..n * kv_dim].to_vec()).collect(),
            values: self.values.iter().map(|v| v[..n * kv_dim].to_vec()).collect(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.len() * 4).sum()
    }
}

/// One row of a step: `token` at `pos` of the sequence whose cache is `caches[seq]`.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub seq: usize,
    pub token: u32,
    pub pos: usize,
    /// Whether the step returns this row's logits (the last prompt token, a decode).
    pub logits: bool,
}

impl BatchModel {
    pub fn new(params: Params) -> BatchModel {
        let c = params.config().clone();
        let (dim, kvd, hid) = (c.dim, c.kv_dim(), c.hidden_dim);
        let layers = (0..c.n_layers)
            .into_par_iter()
            .map(|l| {
                let w = params.layer(l);
                LayerT {
                    wq: Transposed::new(w.wq(), dim, dim),
                    wk: Transposed::new(w.wk(), kvd, dim),
                    wv: Transposed::new(w.wv(), kvd, dim),
                    wo: Transposed::new(w.wo(), dim, dim),
                    w1: Transposed::new(w.w1(), hid, dim),
                    w2: Transposed::new(w.w2(), dim, hid),
                    w3: Transposed::new(w.w3(), hid, dim),
                }
            })
            .collect();
        let wcls = Transposed::new(params.classifier(), c.vocab_size, dim);
        BatchModel { params, layers, wcls }
    }

    pub fn config(&self) -> &llama::Config {
        self.params.config()
    }

    /// Runs `rows` (rows of one sequence consecutive, at consecutive positions that
    /// continue its cache) and returns the logits `[vocab]` of the rows that ask for
    /// them, in row order. Appends every row's keys and values to its cache.
    pub fn step(&self, rows: &[Row], caches: &mut [&mut SeqKv]) -> Vec<Vec<f32>> {
        let c = self.params.config();
        let (dim, kvd, hid, hd) = (c.dim, c.kv_dim(), c.hidden_dim, c.head_dim());
        let n = rows.len();
        if n == 0 {
            return Vec::new();
        }
        // x: [n, dim], the residual stream of every row.
        let emb = self.params.token_embedding();
        let mut x: Vec<f32> =
            rows.iter().flat_map(|r| &emb[r.token as usize * dim..(r.token as usize + 1) * dim]).copied().collect();
        let mut xb = vec![0.0f32; n * dim];
        let mut q = vec![0.0f32; n * dim];
        let mut k = vec![0.0f32; n * kvd];
        let mut v = vec![0.0f32; n * kvd];
        let mut att_out = vec![0.0f32; n * dim];
        let mut xb2 = vec![0.0f32; n * dim];
        let mut hb = vec![0.0f32; n * hid];
        let mut hb2 = vec![0.0f32; n * hid];
        for (l, lw) in self.layers.iter().enumerate() {
            let layer = self.params.layer(l);
            for r in 0..n {
                rmsnorm(&mut xb[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim], layer.rms_att(), c.norm_eps);
            }
            lw.wq.matmul(&xb, n, &mut q);
            lw.wk.matmul(&xb, n, &mut k);
            lw.wv.matmul(&xb, n, &mut v);
            if let Some((bq, bk, bv)) = layer.qkv_bias() {
                for r in 0..n {
                    q[r * dim..(r + 1) * dim].iter_mut().zip(bq).for_each(|(a, b)| *a += b);
                    k[r * kvd..(r + 1) * kvd].iter_mut().zip(bk).for_each(|(a, b)| *a += b);
                    v[r * kvd..(r + 1) * kvd].iter_mut().zip(bv).for_each(|(a, b)| *a += b);
                }
            }
            for (r, row) in rows.iter().enumerate() {
                rope(&mut q[r * dim..(r + 1) * dim], row.pos, hd, c.rope_theta);
                rope(&mut k[r * kvd..(r + 1) * kvd], row.pos, hd, c.rope_theta);
                let cache = &mut *caches[row.seq];
                assert_eq!(cache.keys[l].len(), row.pos * kvd, "rows must continue their sequence's cache");
                cache.keys[l].extend_from_slice(&k[r * kvd..(r + 1) * kvd]);
                cache.values[l].extend_from_slice(&v[r * kvd..(r + 1) * kvd]);
            }
            // Attention, one row per task, each over its own cache up to its position.
            let shared: Vec<&SeqKv> = caches.iter().map(|c| &**c).collect();
            att_out.par_chunks_mut(dim).zip(q.par_chunks(dim)).zip(rows.par_iter()).for_each(|((out, q), row)| {
                attend(out, q, &shared[row.seq].keys[l], &shared[row.seq].values[l], row.pos, c);
            });
            lw.wo.matmul(&att_out, n, &mut xb2);
            x.iter_mut().zip(&xb2).for_each(|(a, b)| *a += b);

            for r in 0..n {
                rmsnorm(&mut xb[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim], layer.rms_ffn(), c.norm_eps);
            }
            lw.w1.matmul(&xb, n, &mut hb);
            lw.w3.matmul(&xb, n, &mut hb2);
            for (g, &u) in hb.iter_mut().zip(&hb2) {
                let silu = *g * (1.0 / (1.0 + (-*g).exp()));
                *g = silu * u;
            }
            lw.w2.matmul(&hb, n, &mut xb);
            x.iter_mut().zip(&xb).for_each(|(a, b)| *a += b);
        }
        // Final norm and classifier for the rows that want logits.
        let want: Vec<usize> = (0..n).filter(|&r| rows[r].logits).collect();
        if want.is_empty() {
            return Vec::new();
        }
        let mut normed = vec![0.0f32; want.len() * dim];
        for (i, &r) in want.iter().enumerate() {
            rmsnorm(
                &mut normed[i * dim..(i + 1) * dim],
                &x[r * dim..(r + 1) * dim],
                self.params.rms_final(),
                c.norm_eps,
            );
        }
        let vocab = c.vocab_size;
        let mut logits = vec![0.0f32; want.len() * vocab];
        self.wcls.matmul(&normed, want.len(), &mut logits);
        logits.chunks(vocab).map(<[f32]>::to_vec).collect()
    }
}

/// One query row's attention, as [`llama::reference::forward`] computes it: per head,
/// scores over positions `0..=pos`, softmax, weighted sum of the values.
///
/// Each score is still one sum over the head's dimensions in order (bit for bit the
/// reference's), but [`SCORE_CHAINS`] positions are scored side by side: one score's
/// adds depend on each other, so a lone chain waits out the add latency at every term
/// while independent chains fill the pipeline.
fn attend(out: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], pos: usize, c: &llama::Config) {
    let (hd, kvd) = (c.head_dim(), c.kv_dim());
    let scale = (hd as f32).sqrt();
    let mut att = vec![0.0f32; pos + 1];
    for h in 0..c.n_heads {
        let kv_head = h / c.kv_group();
        let q_h = &q[h * hd..(h + 1) * hd];
        let key = |t: usize| &keys[t * kvd + kv_head * hd..t * kvd + (kv_head + 1) * hd];
        let mut t0 = 0;
        while t0 + SCORE_CHAINS <= att.len() {
            let ks: [&[f32]; SCORE_CHAINS] = std::array::from_fn(|j| key(t0 + j));
            let mut dots = [0.0f32; SCORE_CHAINS];
            for (i, &a) in q_h.iter().enumerate() {
                for j in 0..SCORE_CHAINS {
                    dots[j] += a * ks[j][i];
                }
            }
            for j in 0..SCORE_CHAINS {
                att[t0 + j] = dots[j] / scale;
            }
            t0 += SCORE_CHAINS;
        }
        for (t, score) in att.iter_mut().enumerate().skip(t0) {
            let mut dot = 0.0f32;
            for (a, b) in q_h.iter().zip(key(t)) {
                dot += a * b;
            }
            *score = dot / scale;
        }
        llama::sampler::softmax(&mut att);
        let out_h = &mut out[h * hd..(h + 1) * hd];
        out_h.fill(0.0);
        for (t, &a) in att.iter().enumerate() {
            let v_t = &values[t * kvd + kv_head * hd..t * kvd + (kv_head + 1) * hd];
            for (o, v) in out_h.iter_mut().zip(v_t) {
                *o += a * v;
            }
        }
    }
}

/// Positions scored at once by [`attend`] (independent sums in flight).
const SCORE_CHAINS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// The GEMM against llama2.c's matmul (the reference's), bit for bit, at row counts
    /// and widths around the tiles: a row's result never depends on the other rows.
    #[test]
    fn gemm_rows_equal_the_reference_matmul_bit_for_bit() {
        let (out, inp) = (37, 29);
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 333.0 - 1.5).sin()).collect();
        let t = Transposed::new(&w, out, inp);
        for rows in [1, 3, 4, 5, 9, 32] {
            let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 104729 % 997) as f32 / 97.0).cos()).collect();
            let mut y = vec![0.0f32; rows * out];
            t.matmul(&x, rows, &mut y);
            for r in 0..rows {
                let mut want = vec![0.0f32; out];
                llama::reference::matmul(&mut want, &x[r * inp..(r + 1) * inp], &w);
                let got = &y[r * out..(r + 1) * out];
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "rows {rows}, row {r}: {got:?} vs {want:?}"
                );
            }
        }
    }

    /// A batched step over three sequences (one prefilled in a chunk of 12 rows, two
    /// decoding) gives each row the reference forward's logits, bit for bit.
    #[test]
    fn batched_step_equals_the_reference_forward() {
        let config = llama::Config { seq_len: 16, ..llama::Config::preset("tiny").unwrap() };
        let params = Params::init(&config, 3).unwrap();
        let model = BatchModel::new(params.clone());
        // Sequence 0 is longer than `SCORE_CHAINS`, so its attention takes the chained path.
        let seqs: [Vec<u32>; 3] = [vec![1, 5, 9, 200, 7, 11, 13, 2, 250, 17, 19, 23], vec![1, 44], vec![1, 3, 3]];
        let want: Vec<Vec<Vec<f32>>> =
            seqs.iter().map(|s| llama::reference::forward_sequence(&params, s).unwrap()).collect();
        let n_layers = config.n_layers;
        let mut kv: Vec<SeqKv> = (0..3).map(|_| SeqKv::new(n_layers)).collect();
        // Sequences 1 and 2 first run their tokens but the last, one per step.
        for s in [1usize, 2] {
            for (pos, &tok) in seqs[s][..seqs[s].len() - 1].iter().enumerate() {
                let mut one: Vec<&mut SeqKv> = vec![&mut kv[s]];
                let got = model.step(&[Row { seq: 0, token: tok, pos, logits: true }], &mut one);
                assert_eq!(got[0], want[s][pos], "sequence {s} alone at {pos}");
            }
        }
        let mut rows: Vec<Row> =
            seqs[0].iter().enumerate().map(|(pos, &token)| Row { seq: 0, token, pos, logits: true }).collect();
        rows.push(Row { seq: 1, token: 44, pos: 1, logits: true });
        rows.push(Row { seq: 2, token: 3, pos: 2, logits: true });
        let mut refs: Vec<&mut SeqKv> = kv.iter_mut().collect();
        let got = model.step(&rows, &mut refs);
        let n0 = seqs[0].len();
        for (pos, logits) in got[..n0].iter().enumerate() {
            assert_eq!(logits, &want[0][pos], "sequence 0 position {pos}");
        }
        assert_eq!(got[n0], want[1][1]);
        assert_eq!(got[n0 + 1], want[2][2]);
    }
}
