//! `matmul` and `conv` on the `gemm` crate (packed, runtime-dispatched SIMD kernels), one
//! band of the output per thread ([`gemm_on_threads`]). Both precisions multiply in f32;
//! fp16 mode rounds the finished result once, as the ANE is reported to accumulate its
//! dot products wider than fp16.
//!
//! `gemm` takes any row and column strides, so operands are passed as the views they
//! are: a weight block sliced out of a dynamic-weight surface and transposed is read in
//! place, never copied.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::elementwise::{par_split, simd, Par, Ptr};
use super::gemv::gemv_axpy;
use super::math::round_f16_slice;
use super::view::{span, StorageId};

/// A matrix window: base address and strides, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mat {
    pub storage: StorageId,
    pub offset: usize,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// Work (m·n·k) under which a batched matmul runs its batch entries in parallel, each
/// single-threaded, rather than one after another with a parallel GEMM each.
const SMALL_GEMM: usize = 1 << 21;

/// `dst[b] = x[b] · y[b]` for every batch index `b`.
#[derive(Clone, Debug)]
pub(crate) struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The result's batch shape; `x_batch`/`y_batch` are the operands' strides over it
    /// (0 where an operand is broadcast).
    pub batch_shape: Vec<usize>,
    pub x: Mat,
    pub x_batch: Vec<isize>,
    pub y: Mat,
    pub y_batch: Vec<isize>,
    /// Packed `[batch…, m, n]` result.
    pub dst: (StorageId, usize),
    pub round: bool,
}

/// Work (`m·n·k`) below which a GEMM runs on one thread: the `gemm` crate's own
/// threshold for threading.
const THREADED_GEMM: usize = 48 * 48 * 256;

/// Threads' bands of a GEMM's output start on multiples of this: the rows of the
/// `gemm` crate's widest f32 micro-kernel, so that no band adds a ragged edge.
const BAND_ALIGN: usize = 16;

/// One GEMM: `dst[m, n] = lhs[m, k] · rhs[k, n]`, `dst` packed with row stride `dst_rs`,
/// on `threads` threads ([`gemm_on_threads`]).
///
/// # Safety
/// The pointers and strides describe valid, non-overlapping (for `dst`) memory.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    threads: usize,
) {
    if k == 0 {
        for i in 0..m {
            std::slice::from_raw_parts_mut(dst.offset(i as isize * dst_rs), n).fill(0.0);
        }
        return;
    }
    // One output column or row whose matrix operand has contiguous rows: a threaded
    // GEMV reads that operand in place (module `gemv`); the `gemm` crate would run it
    // on one thread.
    if n == 1 && lhs_rs == 1 && dst_rs == 1 {
        return gemv_axpy(m, k, dst, rhs, rhs_rs, lhs, lhs_cs, threads);
    }
    if m == 1 && rhs_cs == 1 {
        return gemv_axpy(n, k, dst, lhs, lhs_cs, rhs, rhs_rs, threads);
    }
    gemm_on_threads(m, n, k, dst, dst_rs, 0.0, 1.0, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, threads);
}

/// `dst[m, n] = alpha·dst + beta·lhs[m, k]·rhs[k, n]` (`dst` row-major, row stride
/// `dst_rs`; with `alpha == 0` the old `dst` is not read) on `threads` threads.
///
/// The output is cut into one band per thread along its longer side, and each band is
/// one single-threaded call of the `gemm` crate; the operand the bands share is the
/// smaller one. The crate's own threading splits every depth block between the threads
/// and packs the shared panels together, with a barrier each time. Measured with
/// `anetrain bench gemm` at 256 positions: bands are 5–10 % faster on packed operands
/// and 10–20 % faster on a dynamic-weight surface, whose `Wᵀ` each thread then packs only
/// its own part of; at 2048 positions the two are even. The crate's depth blocking
/// depends on `k` alone, so each element's sum is formed in the same order either way.
///
/// Public for the training crate's weight-gradient and classifier products.
///
/// # Safety
/// The pointers and strides describe valid memory for the three matrices; `dst`
/// overlaps neither operand.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_on_threads(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    alpha: f32,
    beta: f32,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (dst_at, lhs_at, rhs_at) = (Ptr(dst), Ptr(lhs as *mut f32), Ptr(rhs as *mut f32));
    // Rows `r0..r1` and columns `c0..c1` of the product, on the calling thread.
    let band = |r0: usize, r1: usize, c0: usize, c1: usize| {
        let (r, c) = (r0 as isize, c0 as isize);
        gemm(
            r1 - r0,
            c1 - c0,
            k,
            dst_at.get().offset(r * dst_rs + c),
            1,
            dst_rs,
            alpha != 0.0,
            lhs_at.get().offset(r * lhs_rs) as *const f32,
            lhs_cs,
            lhs_rs,
            rhs_at.get().offset(c * rhs_cs) as *const f32,
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    };
    // Bands of at least two micro-kernel widths, across a short side of at least one:
    // then neither a band nor the whole takes one of the crate's small-shape paths
    // (matrix-vector, or dot products for outputs of 16 × 16 or fewer), whose sums run
    // in another order.
    let long = m.max(n);
    let bands = if m.saturating_mul(n).saturating_mul(k) < THREADED_GEMM || m.min(n) < BAND_ALIGN {
        1
    } else {
        threads.min(long / (2 * BAND_ALIGN)).max(1)
    };
    if bands == 1 {
        return band(0, m, 0, n);
    }
    // Where band `i` of `bands` starts along the longer side.
    let start = |i: usize| ((long * i / bands).div_ceil(BAND_ALIGN) * BAND_ALIGN).min(long);
    (0..bands).into_par_iter().for_each(|i| {
        let (lo, hi) = (start(i), start(i + 1));
        if m >= n {
            band(lo, hi, 0, n)
        } else {
            band(0, m, lo, hi)
        }
    });
}

impl Matmul {
    /// Where batch entry `b` (row-major over `batch_shape`) of `x` and `y` starts.
    pub fn batch_offsets(&self, b: usize) -> (isize, isize) {
        let (mut xo, mut yo) = (self.x.offset as isize, self.y.offset as isize);
        let mut r = b;
        for d in (0..self.batch_shape.len()).rev() {
            let i = (r % self.batch_shape[d]) as isize;
            r /= self.batch_shape[d];
            xo += i * self.x_batch[d];
            yo += i * self.y_batch[d];
        }
        (xo, yo)
    }

    /// # Safety
    /// Pointers are the storages named by the plan; `dst` overlaps neither operand.
    pub unsafe fn run(&self, x: Ptr, y: Ptr, dst: Ptr, par: Par) {
        let (m, n, k) = (self.m, self.n, self.k);
        let batches: usize = self.batch_shape.iter().product();
        let one = |b: usize, threads: usize| {
            let (xo, yo) = self.batch_offsets(b);
            let out = dst.get().add(self.dst.1 + b * m * n);
            gemm_into(
                m,
                n,
                k,
                out,
                n as isize,
                x.get().offset(xo),
                self.x.row_stride,
                self.x.col_stride,
                y.get().offset(yo),
                self.y.row_stride,
                self.y.col_stride,
                threads,
            );
            if self.round {
                simd(|| round_f16_slice(std::slice::from_raw_parts_mut(out, m * n)));
            }
        };
        match par {
            Par::Entry { .. } => par_split(batches, 0, par, |lo, hi| (lo..hi).for_each(|b| one(b, 1))),
            Par::Threads(threads) if batches > 1 && threads > 1 && m * n * k < SMALL_GEMM => {
                par_split(batches, batches * m * n * k, par, |lo, hi| (lo..hi).for_each(|b| one(b, 1)))
            }
            Par::Threads(threads) => (0..batches).for_each(|b| one(b, threads)),
        }
    }
}

/// A 2-D convolution, as one GEMM per (batch, group): weights `[O/g, C/g·kH·kW]` times
/// the input's columns. A 1×1 convolution with unit strides and no padding (a linear
/// layer on `[1, C, 1, S]`) reads the input in place; any other first copies the
/// receptive fields into a planned scratch buffer (im2col).
#[derive(Clone, Debug)]
pub(crate) struct Conv {
    /// `x: [N, C, H, W]`: storage, offset, strides.
    pub x: (StorageId, usize, [isize; 4]),
    pub x_shape: [usize; 4],
    /// The weights as a `[O, C/g·kH·kW]` matrix.
    pub w: Mat,
    pub kernel: [usize; 2],
    /// `bias: [O]`: storage, offset, stride.
    pub bias: Option<(StorageId, usize, isize)>,
    pub out_channels: usize,
    pub out_hw: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// top, left.
    pub pad: [usize; 2],
    pub groups: usize,
    /// For a pointwise conv: the stride between consecutive positions of `x` once H and
    /// W are merged. `None`: use the im2col path.
    pub pointwise_col_stride: Option<isize>,
    /// im2col scratch, `[C/g·kH·kW, Ho·Wo]` packed.
    pub scratch: Option<(StorageId, usize)>,
    /// Packed `[N, O, Ho, Wo]` result.
    pub dst: (StorageId, usize),
    pub round: bool,
}

impl Conv {
    /// Every window the conv touches: `(storage, lo..hi)`.
    pub fn spans(&self) -> Vec<(StorageId, (isize, isize))> {
        let [n, c, h, w] = self.x_shape;
        let xs = self.x.2;
        let x = match self.pointwise_col_stride {
            Some(cs) => span(self.x.1, &[n, c, h * w], &[xs[0], xs[1], cs]),
            None => span(self.x.1, &self.x_shape, &xs),
        };
        let kdim = c / self.groups * self.kernel[0] * self.kernel[1];
        let cols = self.out_hw[0] * self.out_hw[1];
        let mut v = vec![
            (self.x.0, x),
            (self.w.storage, span(self.w.offset, &[self.out_channels, kdim], &[self.w.row_stride, self.w.col_stride])),
            (self.dst.0, (self.dst.1 as isize, (self.dst.1 + n * self.out_channels * cols) as isize)),
        ];
        if let Some((st, off, stride)) = self.bias {
            v.push((st, span(off, &[self.out_channels], &[stride])));
        }
        if let Some((st, off)) = self.scratch {
            v.push((st, (off as isize, (off + kdim * cols) as isize)));
        }
        v
    }

    /// # Safety
    /// Pointers are the storages named by the plan; `dst` and `scratch` overlap nothing.
    pub unsafe fn run(&self, x: Ptr, w: Ptr, bias: Option<Ptr>, scratch: Option<Ptr>, dst: Ptr, threads: usize) {
        let [batch, channels, h, wd] = self.x_shape;
        let [kh, kw] = self.kernel;
        let [ho, wo] = self.out_hw;
        let g = self.groups;
        let (cg, og) = (channels / g, self.out_channels / g);
        let kdim = cg * kh * kw;
        let cols = ho * wo;
        let xs = self.x.2;
        for nb in 0..batch {
            for gi in 0..g {
                let out = dst.get().add(self.dst.1 + (nb * self.out_channels + gi * og) * cols);
                let lhs = w.get().offset(self.w.offset as isize + (gi * og) as isize * self.w.row_stride);
                let x_base = self.x.1 as isize + nb as isize * xs[0] + (gi * cg) as isize * xs[1];
                let (rhs, rhs_rs, rhs_cs) = match (self.pointwise_col_stride, scratch) {
                    (Some(cs), _) => (x.get().offset(x_base) as *const f32, xs[1], cs),
                    (None, Some(sc)) => {
                        let col = sc.get().add(self.scratch.expect("planned with scratch").1);
                        for c in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let row =
                                        std::slice::from_raw_parts_mut(col.add(((c * kh + i) * kw + j) * cols), cols);
                                    for oh in 0..ho {
                                        let ih = (oh * self.strides[0] + i * self.dilations[0]) as isize
                                            - self.pad[0] as isize;
                                        for ow in 0..wo {
                                            let iw = (ow * self.strides[1] + j * self.dilations[1]) as isize
                                                - self.pad[1] as isize;
                                            row[oh * wo + ow] =
                                                if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < wd {
                                                    *x.get()
                                                        .offset(x_base + c as isize * xs[1] + ih * xs[2] + iw * xs[3])
                                                } else {
                                                    0.0
                                                };
                                        }
                                    }
                                }
                            }
                        }
                        (col as *const f32, cols as isize, 1)
                    }
                    (None, None) => unreachable!("a non-pointwise conv is planned with scratch"),
                };
                gemm_into(
                    og,
                    cols,
                    kdim,
                    out,
                    cols as isize,
                    lhs,
                    self.w.row_stride,
                    self.w.col_stride,
                    rhs,
                    rhs_rs,
                    rhs_cs,
                    threads,
                );
                let rows = std::slice::from_raw_parts_mut(out, og * cols);
                if let (Some((_, boff, bstride)), Some(bp)) = (self.bias, bias) {
                    for (o, row) in rows.chunks_exact_mut(cols.max(1)).enumerate() {
                        let b = *bp.get().offset(boff as isize + (gi * og + o) as isize * bstride);
                        for v in row.iter_mut() {
                            *v += b;
                        }
                    }
                }
                if self.round {
                    simd(|| round_f16_slice(rows));
                }
            }
        }
    }
}
