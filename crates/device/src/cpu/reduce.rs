//! Softmax and the reductions (`reduce_sum`, `reduce_mean`, `reduce_max`).
//!
//! Both accumulate in f32 and, in fp16 mode, round only their final results: the ANE's
//! reductions are reported to accumulate wider than fp16, and rounding every partial sum
//! would make a 768-channel mean lose three decimal digits for no fidelity gained.

use super::elementwise::{for_rows, par_split, Par, Ptr};
use super::math::{exp, round_f16, round_f16_slice};
use super::view::{coalesce, packed_strides, span, StorageId, View};

/// Softmax over the middle axis of a packed `[outer, len, inner]` block.
#[derive(Clone, Debug)]
pub(crate) struct Softmax {
    pub src: (StorageId, usize),
    pub dst: (StorageId, usize),
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    pub round: bool,
}

/// Columns handled together when softmax runs over a non-last axis: a stack buffer of
/// running maxima and sums this wide keeps the work allocation-free and the rows
/// walked contiguously.
const COLUMN_BLOCK: usize = 64;

#[inline(always)]
pub(crate) fn max8(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] || c[k].is_nan() { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        m = if v > m || v.is_nan() { v } else { m };
    }
    m
}

#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32], round: bool) {
    let m = max8(x);
    for (o, &v) in y.iter_mut().zip(x) {
        *o = exp(v - m);
    }
    normalise(y, round);
}

/// [`softmax_row`] of `y`, in place.
#[inline(always)]
pub(crate) fn softmax_in_place(y: &mut [f32], round: bool) {
    let m = max8(y);
    for o in y.iter_mut() {
        *o = exp(*o - m);
    }
    normalise(y, round);
}

/// `y / Σ y`, rounded to fp16 if asked.
#[inline(always)]
fn normalise(y: &mut [f32], round: bool) {
    let inv = 1.0 / sum8(y);
    if round {
        for o in y.iter_mut() {
            *o = round_f16(*o * inv);
        }
    } else {
        for o in y.iter_mut() {
            *o *= inv;
        }
    }
}

impl Softmax {
    /// # Safety
    /// `src` and `dst` cover the packed blocks at the planned offsets and do not overlap.
    pub unsafe fn run(&self, src: Ptr, dst: Ptr, par: Par) {
        let (outer, len, inner) = (self.outer, self.len, self.inner);
        let total = outer * len * inner;
        let (x, y) = (Ptr(src.get().add(self.src.1)), Ptr(dst.get().add(self.dst.1)));
        if inner == 1 {
            par_split(
                outer,
                total * 8,
                par,
                #[inline(always)]
                |lo, hi| {
                    for r in lo..hi {
                        let xs = std::slice::from_raw_parts(x.get().add(r * len), len);
                        let ys = std::slice::from_raw_parts_mut(y.get().add(r * len), len);
                        softmax_row(xs, ys, self.round);
                    }
                },
            );
            return;
        }
        let blocks = inner.div_ceil(COLUMN_BLOCK);
        par_split(
            outer * blocks,
            total * 8,
            par,
            #[inline(always)]
            |lo, hi| {
                for task in lo..hi {
                    let (o, b) = (task / blocks, task % blocks);
                    let c0 = b * COLUMN_BLOCK;
                    let w = COLUMN_BLOCK.min(inner - c0);
                    let base = o * len * inner + c0;
                    let mut m = [f32::NEG_INFINITY; COLUMN_BLOCK];
                    let mut s = [0f32; COLUMN_BLOCK];
                    let (m, s) = (&mut m[..w], &mut s[..w]);
                    for k in 0..len {
                        let xs = std::slice::from_raw_parts(x.get().add(base + k * inner), w);
                        for (mj, &v) in m.iter_mut().zip(xs) {
                            *mj = if v > *mj || v.is_nan() { v } else { *mj };
                        }
                    }
                    for k in 0..len {
                        let xs = std::slice::from_raw_parts(x.get().add(base + k * inner), w);
                        let ys = std::slice::from_raw_parts_mut(y.get().add(base + k * inner), w);
                        for (((yj, &xj), &mj), sj) in ys.iter_mut().zip(xs).zip(m.iter()).zip(s.iter_mut()) {
                            *yj = exp(xj - mj);
                            *sj += *yj;
                        }
                    }
                    for sj in s.iter_mut() {
                        *sj = 1.0 / *sj;
                    }
                    for k in 0..len {
                        let ys = std::slice::from_raw_parts_mut(y.get().add(base + k * inner), w);
                        if self.round {
                            for (yj, &sj) in ys.iter_mut().zip(s.iter()) {
                                *yj = round_f16(*yj * sj);
                            }
                        } else {
                            for (yj, &sj) in ys.iter_mut().zip(s.iter()) {
                                *yj *= sj;
                            }
                        }
                    }
                }
            },
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReduceKind {
    Sum,
    Mean,
    Max,
}

impl ReduceKind {
    pub fn from_op(op: &str) -> Option<ReduceKind> {
        match op {
            "reduce_sum" => Some(ReduceKind::Sum),
            "reduce_mean" => Some(ReduceKind::Mean),
            "reduce_max" => Some(ReduceKind::Max),
            _ => None,
        }
    }

    fn init(self) -> f32 {
        match self {
            ReduceKind::Sum | ReduceKind::Mean => 0.0,
            ReduceKind::Max => f32::NEG_INFINITY,
        }
    }
}

/// A reduction of a strided source over some axes into a packed destination.
///
/// Two loop orders, chosen at compile time by where the source is contiguous:
/// - the reduced axes are innermost in memory (`reduce_sum` over the last axis): each
///   result is a contiguous sum, done with eight accumulators;
/// - a kept axis is innermost (`reduce_mean` over channels of `[1, C, 1, S]`, as
///   RMSNorm does): whole rows of results are accumulated at once, `dst += src[c, :]`,
///   which streams through memory instead of striding down columns.
#[derive(Clone, Debug)]
pub(crate) struct Reduce {
    pub kind: ReduceKind,
    pub round: bool,
    pub src: (StorageId, usize),
    pub dst: (StorageId, usize),
    /// Kept axes, coalesced: shape, destination strides, source strides.
    kept_shape: Vec<usize>,
    kept_dst: Vec<isize>,
    kept_src: Vec<isize>,
    /// Reduced axes, coalesced: shape and source strides.
    red_shape: Vec<usize>,
    red_src: Vec<isize>,
    count: usize,
    reduced_inner: bool,
}

impl Reduce {
    /// Plans a reduction of `src` over `axes` (sorted, distinct) into the packed block at
    /// `dst`.
    pub fn new(kind: ReduceKind, round: bool, src: &View, axes: &[usize], dst: (StorageId, usize)) -> Reduce {
        let kept: Vec<usize> = (0..src.shape.len()).filter(|d| !axes.contains(d)).collect();
        let kept_shape: Vec<usize> = kept.iter().map(|&d| src.shape[d]).collect();
        let kept_src: Vec<isize> = kept.iter().map(|&d| src.strides[d]).collect();
        let kept_c = coalesce(&kept_shape, &[&packed_strides(&kept_shape), &kept_src]);
        let red_shape: Vec<usize> = axes.iter().map(|&d| src.shape[d]).collect();
        let red_src: Vec<isize> = axes.iter().map(|&d| src.strides[d]).collect();
        let red_c = coalesce(&red_shape, &[&red_src]);
        let count = red_shape.iter().product();
        let red_inner_stride = *red_c.strides[0].last().unwrap();
        let kept_inner_stride = *kept_c.strides[1].last().unwrap();
        let red_inner_len = *red_c.shape.last().unwrap();
        // Reduce along contiguous memory when the reduced axes own the unit stride, or
        // when there is nothing worth vectorising across the kept axes.
        let reduced_inner =
            (red_inner_stride == 1 && red_inner_len >= 8) || kept_inner_stride != 1 || kept_c.shape == [1];
        let mut ks = kept_c.strides.into_iter();
        Reduce {
            kind,
            round,
            src: (src.storage, src.offset),
            dst,
            kept_shape: kept_c.shape,
            kept_dst: ks.next().unwrap(),
            kept_src: ks.next().unwrap(),
            red_shape: red_c.shape,
            red_src: red_c.strides.into_iter().next().unwrap(),
            count,
            reduced_inner,
        }
    }

    /// Address ranges of the source window and of the packed result.
    pub fn spans(&self) -> ((isize, isize), (isize, isize)) {
        let mut shape = self.kept_shape.clone();
        shape.extend_from_slice(&self.red_shape);
        let mut strides = self.kept_src.clone();
        strides.extend_from_slice(&self.red_src);
        let n_out = self.n_out();
        (span(self.src.1, &shape, &strides), (self.dst.1 as isize, (self.dst.1 + n_out) as isize))
    }

    /// Output positions (kept elements).
    pub fn n_out(&self) -> usize {
        self.kept_shape.iter().product()
    }

    /// The destination and source address ranges `[lo, hi)` that output positions
    /// `first..last` touch.
    pub fn spans_of(&self, first: usize, last: usize) -> ((isize, isize), (isize, isize)) {
        if first >= last {
            return ((0, 0), (0, 0));
        }
        let red = span(0, &self.red_shape, &self.red_src);
        let (kd, ks) = (self.kept_dst[self.kept_dst.len() - 1], self.kept_src[self.kept_src.len() - 1]);
        let (mut d, mut s) = ((isize::MAX, isize::MIN), (isize::MAX, isize::MIN));
        let strides = [self.kept_dst.as_slice(), &self.kept_src];
        for_rows(&self.kept_shape, strides, [self.dst.1, self.src.1], first, last, |o, n| {
            let (dr, sr) = (span(o[0] as usize, &[n], &[kd]), span(o[1] as usize, &[n], &[ks]));
            d = (d.0.min(dr.0), d.1.max(dr.1));
            s = (s.0.min(sr.0 + red.0), s.1.max(sr.1 + red.1 - 1));
        });
        (d, s)
    }

    /// # Safety
    /// `src` covers the planned source window, `dst` the packed result; no overlap.
    pub unsafe fn run(&self, src: Ptr, dst: Ptr, par: Par) {
        let n_out = self.n_out();
        let work = n_out * self.count;
        let kind = self.kind;
        let scale = if kind == ReduceKind::Mean { 1.0 / self.count as f32 } else { 1.0 };
        let red_rank = self.red_shape.len();
        let red_inner = self.red_shape[red_rank - 1];
        let red_rows: usize = self.red_shape[..red_rank - 1].iter().product();
        let red_inner_stride = self.red_src[red_rank - 1];
        let finish = |v: f32| {
            let v = if kind == ReduceKind::Mean { v * scale } else { v };
            if self.round {
                round_f16(v)
            } else {
                v
            }
        };
        // The source address of reduced row `r` relative to a kept position.
        let red_row_offset = |mut r: usize| {
            let mut off = 0isize;
            for d in (0..red_rank - 1).rev() {
                off += (r % self.red_shape[d]) as isize * self.red_src[d];
                r /= self.red_shape[d];
            }
            off
        };
        if self.reduced_inner {
            par_split(
                n_out,
                work,
                par,
                #[inline(always)]
                |lo, hi| {
                    let strides = [self.kept_dst.as_slice(), &self.kept_src];
                    for_rows(
                        &self.kept_shape,
                        strides,
                        [self.dst.1, self.src.1],
                        lo,
                        hi,
                        #[inline(always)]
                        |o, n| {
                            let k_inner_d = self.kept_dst[self.kept_dst.len() - 1];
                            let k_inner_s = self.kept_src[self.kept_src.len() - 1];
                            for j in 0..n as isize {
                                let at = o[1] + j * k_inner_s;
                                let mut acc = kind.init();
                                for r in 0..red_rows {
                                    let p = src.get().offset(at + red_row_offset(r)) as *const f32;
                                    let v = if red_inner_stride == 1 {
                                        let row = std::slice::from_raw_parts(p, red_inner);
                                        match kind {
                                            ReduceKind::Max => max8(row),
                                            _ => sum8(row),
                                        }
                                    } else {
                                        let mut a = kind.init();
                                        for i in 0..red_inner as isize {
                                            let x = *p.offset(i * red_inner_stride);
                                            a = combine(kind, a, x);
                                        }
                                        a
                                    };
                                    acc = combine(kind, acc, v);
                                }
                                *dst.get().offset(o[0] + j * k_inner_d) = finish(acc);
                            }
                        },
                    );
                },
            );
            return;
        }
        // Kept axis innermost: accumulate whole result rows per reduced element.
        par_split(
            n_out,
            work,
            par,
            #[inline(always)]
            |lo, hi| {
                let strides = [self.kept_dst.as_slice(), &self.kept_src];
                let base = [self.dst.1, self.src.1];
                for_rows(
                    &self.kept_shape,
                    strides,
                    base,
                    lo,
                    hi,
                    #[inline(always)]
                    |o, n| {
                        let d = std::slice::from_raw_parts_mut(dst.get().offset(o[0]), n);
                        d.fill(kind.init());
                    },
                );
                for r in 0..red_rows {
                    let row_off = red_row_offset(r);
                    for i in 0..red_inner as isize {
                        let shift = row_off + i * red_inner_stride;
                        for_rows(
                            &self.kept_shape,
                            strides,
                            base,
                            lo,
                            hi,
                            #[inline(always)]
                            |o, n| {
                                let d = std::slice::from_raw_parts_mut(dst.get().offset(o[0]), n);
                                let s = std::slice::from_raw_parts(src.get().offset(o[1] + shift) as *const f32, n);
                                match kind {
                                    ReduceKind::Max => {
                                        for (a, &x) in d.iter_mut().zip(s) {
                                            *a = combine(ReduceKind::Max, *a, x);
                                        }
                                    }
                                    _ => {
                                        for (a, &x) in d.iter_mut().zip(s) {
                                            *a += x;
                                        }
                                    }
                                }
                            },
                        );
                    }
                }
                for_rows(
                    &self.kept_shape,
                    strides,
                    base,
                    lo,
                    hi,
                    #[inline(always)]
                    |o, n| {
                        let d = std::slice::from_raw_parts_mut(dst.get().offset(o[0]), n);
                        if kind == ReduceKind::Mean {
                            for a in d.iter_mut() {
                                *a *= scale;
                            }
                        }
                        if self.round {
                            round_f16_slice(d);
                        }
                    },
                );
            },
        );
    }
}

#[inline(always)]
fn combine(kind: ReduceKind, a: f32, x: f32) -> f32 {
    match kind {
        ReduceKind::Max => {
            if x > a || x.is_nan() {
                x
            } else {
                a
            }
        }
        _ => a + x,
    }
}
