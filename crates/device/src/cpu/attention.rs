//! `softmax(x·y + mask, axis = -1)` as one step: attention's scores and probabilities.
//!
//! The planner fuses a batched `matmul` whose result only feeds an `add` of a constant
//! mask, whose result only feeds a `softmax` over the last axis. Unfused, each of the
//! three steps passes over the whole `[batch…, m, n]` score tensor (12 MB per layer for
//! Stories110M at batch 4, three times, out of cache). Fused, a task takes a block of
//! query rows of one batch entry and computes, masks and normalises its scores while
//! they are in cache, straight into the probabilities.
//!
//! A causal mask is used exactly. Where the trailing columns of a block's rows are all
//! masked with a large negative constant, their scores are not computed and their
//! probabilities are written as 0: `exp` of a score that far below its row's maximum
//! underflows (the unfused step gives at most `exp(-104)`, under 10⁻⁴⁵). That the skipped
//! scores are that far below is checked for every row when it runs, with the bound
//! `x_i·y_j ≤ |x_i|·max_j |y_j|`; a row that fails the check (huge activations, or a
//! NaN) gets its skipped scores computed after all, so the result never depends on the
//! shortcut.

use super::elementwise::{par_split, Par, Ptr};
use super::linalg::{gemm_into, Matmul};
use super::math::round_f16_slice;
use super::reduce::{max8, softmax_in_place};

/// Query rows per task: small enough that a causal block skips most of the masked
/// columns, large enough for an efficient GEMM.
const ROW_BLOCK: usize = 32;

/// Mask values at or below this are candidates for skipping (the training kernels use
/// −30000; anything this negative puts a score thousands below its row's maximum).
const SKIPPABLE: f32 = -1000.0;

/// How far below its row's maximum a skipped score must provably be. `exp` underflows
/// below −104; the margin covers the rounding of the norms in the bound.
const UNDERFLOW_MARGIN: f64 = 128.0;

thread_local! {
    /// Each thread's copy of the `y` operand of the batch entry it works on (see
    /// [`ScoresSoftmax::pack_y`]); it grows to `k × n` once, then is reused.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Clone, Debug)]
pub(crate) struct ScoresSoftmax {
    /// The scores `x·y`; its `dst` is the probabilities' (packed `[batch…, m, n]`).
    pub matmul: Matmul,
    /// The mask `[m, n]`, the same for every batch entry, row-major.
    pub mask: Vec<f32>,
    /// Per row `i`: columns `row_end[i]..n` are all masked at or below [`SKIPPABLE`].
    pub row_end: Vec<usize>,
    /// The largest mask value among those columns (−∞ if there are none).
    pub skipped_mask_max: f32,
    /// fp16 mode: round the scores, the masked scores and the probabilities, as the
    /// three unfused steps do.
    pub round: bool,
}

impl ScoresSoftmax {
    /// Plans the fused step from the scores matmul and the mask's data (`mask(i, j)` for
    /// row `i`, column `j`).
    pub fn new(matmul: Matmul, mask: impl Fn(usize, usize) -> f32, round: bool) -> ScoresSoftmax {
        let (m, n) = (matmul.m, matmul.n);
        let mask: Vec<f32> = (0..m * n).map(|e| mask(e / n, e % n)).collect();
        let mut skipped_mask_max = f32::NEG_INFINITY;
        let row_end = mask
            .chunks_exact(n)
            .map(|row| {
                let end = row.iter().rposition(|&v| v > SKIPPABLE || v.is_nan()).map_or(0, |j| j + 1);
                if end == 0 {
                    // Every column masked: nothing to normalise against; keep the row whole.
                    return n;
                }
                skipped_mask_max = row[end..].iter().fold(skipped_mask_max, |a, &v| a.max(v));
                end
            })
            .collect();
        ScoresSoftmax { matmul, mask, row_end, skipped_mask_max, round }
    }

    /// # Safety
    /// As [`Matmul::run`].
    pub unsafe fn run(&self, x: Ptr, y: Ptr, dst: Ptr, par: Par) {
        let mm = &self.matmul;
        let (m, n, k) = (mm.m, mm.n, mm.k);
        let batches: usize = mm.batch_shape.iter().product();
        let blocks = m.div_ceil(ROW_BLOCK);
        // `inline(always)`: the closure must be compiled inside `par_split`'s AVX2 context
        // (see `elementwise::simd`), or the softmax's `exp` runs on SSE2 at a third of
        // the speed.
        par_split(
            batches * blocks,
            batches * m * n * k,
            par,
            #[inline(always)]
            |lo, hi| {
                // max_j |y_j| of the batch entry last seen (tasks come in batch order), and
                // |x_i| of the block's rows.
                let mut y_norm: Option<(usize, f64)> = None;
                let mut x_norms = [0f64; ROW_BLOCK];
                // Taken out of the thread-local for the task (no closure: this code must
                // stay inlined in the AVX2 context) and put back at the end.
                let mut panel = PANEL.take();
                // The batch entry whose `y` is in `panel`.
                let mut packed = None;
                for task in lo..hi {
                    let (b, block) = (task / blocks, task % blocks);
                    let (xo, yo) = mm.batch_offsets(b);
                    let (xb, yb) = (x.get().offset(xo) as *const f32, y.get().offset(yo) as *const f32);
                    if packed != Some(b) {
                        self.pack_y(yb, &mut panel);
                        packed = Some(b);
                    }
                    let (r0, r1) = (block * ROW_BLOCK, (block * ROW_BLOCK + ROW_BLOCK).min(m));
                    let cols = self.row_end[r0..r1].iter().copied().max().unwrap_or(n);
                    let out = dst.get().add(mm.dst.1 + b * m * n + r0 * n);
                    gemm_into(
                        r1 - r0,
                        cols,
                        k,
                        out,
                        n as isize,
                        xb.offset(r0 as isize * mm.x.row_stride),
                        mm.x.row_stride,
                        mm.x.col_stride,
                        panel.as_ptr(),
                        n as isize,
                        1,
                        1,
                    );
                    let y_max = if cols < n {
                        self.row_norms(xb, r0, &mut x_norms[..r1 - r0]);
                        match y_norm {
                            Some((seen, v)) if seen == b => v,
                            _ => {
                                let v = self.max_column_norm(yb);
                                y_norm = Some((b, v));
                                v
                            }
                        }
                    } else {
                        0.0
                    };
                    for i in r0..r1 {
                        let row = std::slice::from_raw_parts_mut(out.add((i - r0) * n), n);
                        self.mask_row(&mut row[..cols], i, 0);
                        if cols < n {
                            // (A NaN maximum fails the check below: the row is computed whole.)
                            let max = max8(&row[..cols]);
                            let bound = x_norms[i - r0] * y_max + f64::from(self.skipped_mask_max);
                            if bound - f64::from(max) < -UNDERFLOW_MARGIN {
                                row[cols..].fill(0.0);
                                softmax_in_place(&mut row[..cols], self.round);
                                continue;
                            }
                            // The shortcut is not provably exact for this row: compute it all.
                            for (j, s) in row.iter_mut().enumerate().skip(cols) {
                                *s = (0..k)
                                    .map(|kk| {
                                        *xb.offset(i as isize * mm.x.row_stride + kk as isize * mm.x.col_stride)
                                            * *yb.offset(kk as isize * mm.y.row_stride + j as isize * mm.y.col_stride)
                                    })
                                    .sum();
                            }
                            self.mask_row(&mut row[cols..], i, cols);
                        }
                        softmax_in_place(row, self.round);
                    }
                }
                PANEL.set(panel);
            },
        );
    }

    /// Copies this batch entry's `y` (`[k, n]`) into `panel`, row-major and contiguous.
    ///
    /// In the training kernels `y` is `kᵀ` read in place from the `[C, T]` surface: its
    /// `k` rows lie a surface row apart (16 KB at Stories15M's batch, so every one maps to
    /// the same L1 set), and the block GEMMs then ran at a third of their speed. The copy
    /// is made once per batch entry and read by all of its row blocks.
    #[inline(always)]
    unsafe fn pack_y(&self, yb: *const f32, panel: &mut Vec<f32>) {
        let mm = &self.matmul;
        let (n, k) = (mm.n, mm.k);
        panel.resize(k * n, 0.0);
        if n == 0 {
            return;
        }
        for (kk, row) in panel.chunks_exact_mut(n).enumerate() {
            let src = yb.offset(kk as isize * mm.y.row_stride);
            if mm.y.col_stride == 1 {
                row.copy_from_slice(std::slice::from_raw_parts(src, n));
            } else {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = *src.offset(j as isize * mm.y.col_stride);
                }
            }
        }
    }

    /// Scores `row` (columns `c0..` of row `i`) plus the mask, rounded as the unfused
    /// matmul and add would. (Inlined into `run`'s AVX2 context.)
    #[inline(always)]
    fn mask_row(&self, row: &mut [f32], i: usize, c0: usize) {
        let n = self.matmul.n;
        if self.round {
            round_f16_slice(row);
        }
        for (s, &mv) in row.iter_mut().zip(&self.mask[i * n + c0..]) {
            *s += mv;
        }
        if self.round {
            round_f16_slice(row);
        }
    }

    /// `|x_i|` for the rows `r0..r0 + norms.len()` of this batch entry's `x`, walking
    /// `k` outside so that each step reads nearby rows (in the training kernels the
    /// rows of `x` are adjacent and its columns far apart).
    unsafe fn row_norms(&self, xb: *const f32, r0: usize, norms: &mut [f64]) {
        let mm = &self.matmul;
        norms.fill(0.0);
        for kk in 0..mm.k {
            let col = xb.offset(kk as isize * mm.x.col_stride);
            for (i, s) in (r0..).zip(norms.iter_mut()) {
                *s += f64::from(*col.offset(i as isize * mm.x.row_stride)).powi(2);
            }
        }
        norms.iter_mut().for_each(|s| *s = s.sqrt());
    }

    /// `max_j |y_j|` over the columns of this batch entry's `y`, summing a row segment
    /// at a time into a stack buffer (no allocation while a kernel runs).
    unsafe fn max_column_norm(&self, yb: *const f32) -> f64 {
        const COLUMNS: usize = 256;
        let mm = &self.matmul;
        let mut max = 0.0f64;
        for j0 in (0..mm.n).step_by(COLUMNS) {
            let mut sums = [0f64; COLUMNS];
            let sums = &mut sums[..COLUMNS.min(mm.n - j0)];
            for kk in 0..mm.k {
                let row = yb.offset(kk as isize * mm.y.row_stride + j0 as isize * mm.y.col_stride);
                for (j, s) in sums.iter_mut().enumerate() {
                    *s += f64::from(*row.offset(j as isize * mm.y.col_stride)).powi(2);
                }
            }
            // NaN is sticky (`f64::max` would drop it), so that a NaN column fails the bound.
            max = sums.iter().map(|s| s.sqrt()).fold(max, |a, v| if v > a || v.is_nan() { v } else { a });
        }
        max
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use mil::builder::FunctionBuilder;
    use mil::{DType, Dialect, Program, TensorType, Var};

    use crate::cpu::exec::Step;
    use crate::cpu::plan::plan_program;
    use crate::cpu::CpuDevice;
    use crate::{Device, Precision, Surface, Weights};

    const MASKED: f32 = -30000.0;

    /// `p = softmax(q·kᵀ + mask)` for `q, k: [B, H, S, D]`, the mask a constant of
    /// `mask_shape` cast to fp32 as the training kernels write it: the fusable pattern.
    pub(crate) fn probabilities(
        f: &mut FunctionBuilder,
        weights: &mut Weights,
        [q, k]: [&Var; 2],
        mask_shape: &[usize],
        mask: &[f32],
    ) -> Var {
        let mask = weights.add_tensor("mask", mask_shape, mask);
        let mask = f.constant("mask", mask);
        let mask = f.cast("mask32", &mask, DType::Fp32);
        let scores = f.matmul("scores", q, k, false, true);
        let masked = f.add("masked", &scores, &mask);
        f.softmax("p", &masked, -1)
    }

    /// Deterministic values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        crate::cpu::bench::values(n, seed).into_iter().map(|v| v * scale).collect()
    }

    fn causal(s: usize) -> Vec<f32> {
        (0..s * s).map(|e| if e % s > e / s { MASKED } else { 0.0 }).collect()
    }

    /// Inputs `q`, `k`, `v: [B, H, S, D]`; `p = softmax(q·kᵀ + mask)`, outputs `p` and
    /// `o = p·v`. `mask` is `[S, S]` (or `[B, 1, S, S]` when `per_batch`).
    struct Case {
        b: usize,
        h: usize,
        s: usize,
        d: usize,
        mask: Vec<f32>,
        per_batch: bool,
    }

    impl Case {
        fn program(&self, weights: &mut Weights) -> Program {
            let (b, h, s, d) = (self.b, self.h, self.s, self.d);
            let mut f = FunctionBuilder::new("main", Dialect::Ios18);
            let ty = TensorType::new(DType::Fp32, [b, h, s, d]);
            let (q, k, v) = (f.input("q", ty.clone()), f.input("k", ty.clone()), f.input("v", ty));
            let mask_shape = if self.per_batch { vec![b, 1, s, s] } else { vec![s, s] };
            let p = probabilities(&mut f, weights, [&q, &k], &mask_shape, &self.mask);
            let o = f.matmul("o", &p, &v, false, false);
            f.output(&p);
            f.output(&o);
            Program::new(Dialect::Ios18, f.finish().unwrap())
        }

        /// `(p, o)` from `device`, and whether the kernel has a fused step.
        fn run(&self, device: &CpuDevice, qkv: [&[f32]; 3]) -> (Vec<f32>, Vec<f32>, bool) {
            let mut weights = Weights::new();
            let program = self.program(&mut weights);
            let kernel = plan_program(&program, &weights, device.precision(), 2, device.fuse);
            let fused = kernel.steps.iter().any(|s| match s {
                Step::Region { steps, .. } => steps.iter().any(|s| matches!(s, Step::ScoresSoftmax(_))),
                s => matches!(s, Step::ScoresSoftmax(_)),
            });
            let mut kernel = device.compile(&program, &weights).unwrap();
            let shape = [self.b, self.h, self.s, self.d];
            let inputs: Vec<Surface> = qkv.iter().map(|x| Surface::from_f32(DType::Fp32, &shape, x)).collect();
            let mut p = Surface::from_f32(DType::Fp32, &[self.b, self.h, self.s, self.s], &vec![0.0; self.numel_p()]);
            let mut o = Surface::from_f32(DType::Fp32, &shape, &vec![0.0; qkv[0].len()]);
            kernel.eval(&[&inputs[0], &inputs[1], &inputs[2]], &mut [&mut p, &mut o]).unwrap();
            (p.to_f32(), o.to_f32(), fused)
        }

        fn numel_p(&self) -> usize {
            self.b * self.h * self.s * self.s
        }

        /// The f64 reference `(p, o)` (the fp16 mask values as the kernel reads them).
        fn reference(&self, [q, k, v]: [&[f32]; 3]) -> (Vec<f64>, Vec<f64>) {
            let (s, d) = (self.s, self.d);
            let mut p = vec![0.0; self.numel_p()];
            let mut o = vec![0.0; q.len()];
            for bh in 0..self.b * self.h {
                let mask_at = if self.per_batch { bh / self.h * s * s } else { 0 };
                for i in 0..s {
                    let row: Vec<f64> = (0..s)
                        .map(|j| {
                            let dot: f64 =
                                (0..d).map(|e| q[(bh * s + i) * d + e] as f64 * k[(bh * s + j) * d + e] as f64).sum();
                            dot + half::f16::from_f32(self.mask[mask_at + i * s + j]).to_f64()
                        })
                        .collect();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
                    for j in 0..s {
                        let pij = (row[j] - max).exp() / sum;
                        p[(bh * s + i) * s + j] = pij;
                        for e in 0..d {
                            o[(bh * s + i) * d + e] += pij * v[(bh * s + j) * d + e] as f64;
                        }
                    }
                }
            }
            (p, o)
        }
    }

    fn max_diff(got: &[f32], want: &[f64]) -> f64 {
        got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
    }

    fn inputs(case: &Case, scale: f32) -> [Vec<f32>; 3] {
        let n = case.b * case.h * case.s * case.d;
        [values(n, 1, scale), values(n, 2, scale), values(n, 3, 1.0)]
    }

    /// Fused and unfused kernels agree with the f64 reference in fp32 (to float rounding:
    /// probabilities are at most 1 and outputs sums of at most `S` products of size ≤ 1),
    /// and the fused one skips nothing it should not: masked probabilities are exactly 0.
    #[test]
    fn causal_attention_matches_the_reference_fused_or_not() {
        // 80: not a multiple of the row block (a partial last block); 300: more columns
        // than the column-norm buffer holds.
        for (b, h, s) in [(2, 3, 80), (1, 2, 300)] {
            causal_case(Case { b, h, s, d: 16, mask: causal(s), per_batch: false });
        }
    }

    fn causal_case(case: Case) {
        let s = case.s;
        let x = inputs(&case, 1.0);
        let qkv = [&x[0][..], &x[1][..], &x[2][..]];
        let (p_ref, o_ref) = case.reference(qkv);
        for fuse in [true, false] {
            let device = CpuDevice::new(Precision::Fp32).with_threads(2).with_fusion(fuse);
            let (p, o, fused) = case.run(&device, qkv);
            assert_eq!(fused, fuse);
            assert!(max_diff(&p, &p_ref) < 1e-6, "fuse {fuse}: p off by {}", max_diff(&p, &p_ref));
            assert!(max_diff(&o, &o_ref) < 1e-5, "fuse {fuse}: o off by {}", max_diff(&o, &o_ref));
            for (e, &pe) in p.iter().enumerate() {
                if e % s > e / s % s {
                    assert_eq!(pe, 0.0, "masked probability at {e}");
                }
            }
        }
    }

    /// Keys given as `kᵀ: [B, H, D, S]` and transposed back by a view, so that the
    /// scores' `y` operand has contiguous rows (as in the training kernels, where it is
    /// read from a `[C, T]` surface) rather than strided ones: the same probabilities.
    #[test]
    fn contiguous_key_rows_give_the_same_probabilities() {
        let (b, h, s, d) = (2, 3, 70, 16);
        let case = Case { b, h, s, d, mask: causal(s), per_batch: false };
        let x = inputs(&case, 1.0);
        let (p_ref, _) = case.reference([&x[0][..], &x[1][..], &x[2][..]]);
        let mut kt = vec![0.0; x[1].len()];
        for bh in 0..b * h {
            for j in 0..s {
                for e in 0..d {
                    kt[(bh * d + e) * s + j] = x[1][(bh * s + j) * d + e];
                }
            }
        }
        let mut weights = Weights::new();
        let mut f = FunctionBuilder::new("main", Dialect::Ios18);
        let q = f.input("q", TensorType::new(DType::Fp32, [b, h, s, d]));
        let kt_in = f.input("kt", TensorType::new(DType::Fp32, [b, h, d, s]));
        let k = f.transpose("k", &kt_in, &[0, 1, 3, 2]);
        let p = probabilities(&mut f, &mut weights, [&q, &k], &[s, s], &case.mask);
        f.output(&p);
        let program = Program::new(Dialect::Ios18, f.finish().unwrap());
        let device = CpuDevice::new(Precision::Fp32).with_threads(2);
        let kernel = plan_program(&program, &weights, device.precision(), 2, true);
        let y_contiguous =
            kernel.steps.iter().any(|s| matches!(s, Step::ScoresSoftmax(f) if f.matmul.y.col_stride == 1));
        assert!(y_contiguous, "the fused step reads kᵀ's rows in place");
        let mut kernel = device.compile(&program, &weights).unwrap();
        let q_in = Surface::from_f32(DType::Fp32, &[b, h, s, d], &x[0]);
        let kt_in = Surface::from_f32(DType::Fp32, &[b, h, d, s], &kt);
        let mut p = Surface::from_f32(DType::Fp32, &[b, h, s, s], &vec![0.0; case.numel_p()]);
        kernel.eval(&[&q_in, &kt_in], &mut [&mut p]).unwrap();
        assert!(max_diff(&p.to_f32(), &p_ref) < 1e-6, "p off by {}", max_diff(&p.to_f32(), &p_ref));
    }

    /// Scores far larger than the mask (|q·k| up to ~10⁵ against −30000): the skipped
    /// columns are not provably negligible, so every row falls back to the full
    /// computation, and the "masked" columns get the weight the unfused kernel gives them.
    #[test]
    fn huge_scores_fall_back_to_the_full_row() {
        let s = 40;
        let case = Case { b: 1, h: 2, s, d: 8, mask: causal(s), per_batch: false };
        let x = inputs(&case, 150.0);
        let qkv = [&x[0][..], &x[1][..], &x[2][..]];
        let (p_ref, o_ref) = case.reference(qkv);
        let device = CpuDevice::new(Precision::Fp32).with_threads(2);
        let (p, o, fused) = case.run(&device, qkv);
        assert!(fused);
        assert!(p.iter().enumerate().any(|(e, &pe)| e % s > e / s % s && pe > 0.5), "some masked column dominates");
        // Scores of ~10⁵ in f32 carry absolute errors of ~0.01: probabilities near 0/1.
        assert!(max_diff(&p, &p_ref) < 0.05, "p off by {}", max_diff(&p, &p_ref));
        assert!(max_diff(&o, &o_ref) < 0.05, "o off by {}", max_diff(&o, &o_ref));
    }

    /// A NaN in a masked column poisons its rows unfused (NaN − 30000 is NaN, and
    /// softmax's maximum keeps it): fused, the bound sees it and does the same.
    #[test]
    fn nan_in_a_skipped_column_is_not_hidden() {
        let s = 48;
        let case = Case { b: 1, h: 1, s, d: 8, mask: causal(s), per_batch: false };
        let mut x = inputs(&case, 1.0);
        x[1][(s - 1) * 8] = f32::NAN; // key s − 1: masked for every row but the last
        let qkv = [&x[0][..], &x[1][..], &x[2][..]];
        let run = |fuse| case.run(&CpuDevice::new(Precision::Fp32).with_threads(2).with_fusion(fuse), qkv);
        let ((p1, _, f1), (p0, _, f0)) = (run(true), run(false));
        assert!(f1 && !f0);
        assert!(p0.iter().all(|v| v.is_nan()), "unfused: every row sees the NaN");
        assert!(p1.iter().all(|v| v.is_nan()), "fused: so does every row");
    }

    /// fp16 mode: fused and unfused round at the same points, so they agree to a unit
    /// in the last place of fp16 (2⁻¹¹ relative, on values ≤ 1 for p) — the GEMM's
    /// summation order may differ between a block's columns and the whole row.
    #[test]
    fn fp16_fused_and_unfused_agree() {
        let s = 64;
        let case = Case { b: 1, h: 2, s, d: 32, mask: causal(s), per_batch: false };
        let x = inputs(&case, 0.5);
        let qkv = [&x[0][..], &x[1][..], &x[2][..]];
        let run = |fuse| case.run(&CpuDevice::new(Precision::Fp16).with_threads(2).with_fusion(fuse), qkv);
        let ((p1, o1, f1), (p0, o0, f0)) = (run(true), run(false));
        assert!(f1 && !f0);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(&x, &y)| (x - y).abs() <= 2.0 * 2f32.powi(-11) * x.abs().max(y.abs()).max(2f32.powi(-14)))
        };
        assert!(close(&p1, &p0) && close(&o1, &o0));
        assert!(p1.iter().zip(&p0).filter(|(a, b)| a != b).count() * 50 < p1.len(), "mostly bit-identical");
    }

    /// Masks that are not the same for every batch entry are not fused; a mask with no
    /// skippable column and one with a fully masked row are fused and still exact. (A
    /// fully masked row holds scores − 30000 in f32, whose unit in the last place is
    /// 2⁻⁹: its probabilities are only that accurate, fused or not.)
    #[test]
    fn other_masks() {
        let (b, h, s, d) = (2, 2, 24, 8);
        let mut fully_masked_row = causal(s);
        fully_masked_row[3 * s..4 * s].fill(MASKED);
        let cases = [
            (Case { b, h, s, d, mask: values(b * s * s, 9, 2.0), per_batch: true }, false, 1e-6),
            (Case { b, h, s, d, mask: values(s * s, 9, 2.0), per_batch: false }, true, 1e-6),
            (Case { b, h, s, d, mask: fully_masked_row, per_batch: false }, true, 1e-3),
        ];
        for (case, should_fuse, tolerance) in cases {
            let x = inputs(&case, 1.0);
            let qkv = [&x[0][..], &x[1][..], &x[2][..]];
            let (p_ref, o_ref) = case.reference(qkv);
            let (p, o, fused) = case.run(&CpuDevice::new(Precision::Fp32).with_threads(2), qkv);
            assert_eq!(fused, should_fuse);
            let (dp, d_o) = (max_diff(&p, &p_ref), max_diff(&o, &o_ref));
            assert!(dp < tolerance && d_o < 10.0 * tolerance, "fused {fused}: p off by {dp}, o by {d_o}");
        }
    }
}
