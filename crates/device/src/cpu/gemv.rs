//! Matrix–vector products for one-position matmuls: a decode step's projections and
//! classifier (`Wᵀ·x` with `x: [IC, 1]`) and attention's one-query rows (`q·K`).
//!
//! A decode step reads every weight once and does two flops per weight read, so it is
//! bound by memory bandwidth, not arithmetic: what matters is that every core streams
//! its share of the weights, and that nothing is packed or copied first. The `gemm`
//! crate runs such a product on one thread (its matrix–vector path) whatever
//! parallelism it is given, which leaves the other cores idle; and it packs nothing
//! here, so a GEMV of our own loses nothing it does.
//!
//! The form computed is `out[o] = Σ_i v[i] · a[i·a_rs + o]` ("axpy" form: the rows of
//! `a` are contiguous, as a weight block `Wᵀ [IC, OC]` sits in a dynamic-weight surface).
//! The outputs are cut into one contiguous band per thread; each band is walked in
//! chunks that stay in L1 while every row of `a` streams past. The sum for each output
//! runs over `i` in order, one multiply and one add per term (Rust never contracts them
//! into an FMA), so the result is bit-identical to the naive loop on any thread count
//! and with or without SIMD. Hand-written because no crate we found offers a threaded
//! f32 GEMV over a strided operand; the loops are plain Rust that the compiler
//! vectorises for the instruction set detected at run time.

use rayon::prelude::*;

use super::elementwise::Ptr;

/// Outputs per chunk: the accumulators (64 KiB) stay in L2 (1 MiB per Zen 4 core),
/// and a whole band of a classifier's row streams by contiguously. With 2048 (8 KiB, in
/// L1) the rows of a 32000-wide classifier were read in 16 strided streams, and a
/// Stories15M decode step was slower (measured with `anetrain sample`, one thread).
const CHUNK: usize = 16384;

/// Products smaller than this many multiply–adds run on one thread: below it, waking a
/// second thread costs about as much as the product (a few µs).
const THREADED_GEMV: usize = 1 << 16;

/// Bands start on multiples of 16 outputs (a 64-byte cache line of f32), so that no two
/// threads write one line.
const BAND_ALIGN: usize = 16;

/// `out[o] = Σ_{i<k} v[i·v_stride] · a[i·a_rs + o]` for `o < n`, on up to `threads`
/// threads.
///
/// # Safety
/// `v`, `a` and `out` describe valid memory for those indices; `out` (`n` contiguous
/// elements) overlaps neither operand.
#[allow(clippy::too_many_arguments)] // a BLAS-style call: sizes, then each operand with its strides
pub(crate) unsafe fn gemv_axpy(
    n: usize,
    k: usize,
    out: *mut f32,
    v: *const f32,
    v_stride: isize,
    a: *const f32,
    a_rs: isize,
    threads: usize,
) {
    if n == 0 {
        return;
    }
    let (out, v, a) = (Ptr(out), Ptr(v as *mut f32), Ptr(a as *mut f32));
    let bands = if n.saturating_mul(k) < THREADED_GEMV { 1 } else { threads.min(n / BAND_ALIGN).max(1) };
    let band = |lo: usize, hi: usize| {
        let dst = std::slice::from_raw_parts_mut(out.get().add(lo), hi - lo);
        dispatch(dst, k, v.get(), v_stride, a.get().add(lo), a_rs);
    };
    if bands == 1 {
        return band(0, n);
    }
    let start = |i: usize| ((n * i / bands).div_ceil(BAND_ALIGN) * BAND_ALIGN).min(n);
    (0..bands).into_par_iter().for_each(|i| band(start(i), start(i + 1)));
}

/// [`band`] compiled for the widest vector instructions this CPU has.
unsafe fn dispatch(dst: &mut [f32], k: usize, v: *const f32, v_stride: isize, a: *const f32, a_rs: isize) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(dst: &mut [f32], k: usize, v: *const f32, vs: isize, a: *const f32, a_rs: isize) {
            band(dst, k, v, vs, a, a_rs)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(dst: &mut [f32], k: usize, v: *const f32, vs: isize, a: *const f32, a_rs: isize) {
            band(dst, k, v, vs, a, a_rs)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return avx512(dst, k, v, v_stride, a, a_rs);
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return avx2(dst, k, v, v_stride, a, a_rs);
        }
    }
    band(dst, k, v, v_stride, a, a_rs)
}

/// One band on the calling thread: chunk by chunk, eight rows of `a` per pass over the
/// accumulators (an eighth of the accumulator loads and stores), terms added in order.
#[inline(always)]
unsafe fn band(dst: &mut [f32], k: usize, v: *const f32, v_stride: isize, a: *const f32, a_rs: isize) {
    // Accumulators on the stack, never allocated: a small array for small products
    // (attention's rows) so that they do not zero 64 KiB each.
    if dst.len() <= SMALL_CHUNK {
        band_in::<SMALL_CHUNK>(dst, k, v, v_stride, a, a_rs)
    } else {
        band_in::<CHUNK>(dst, k, v, v_stride, a, a_rs)
    }
}

/// Accumulators of the small products' chunk (8 KiB).
const SMALL_CHUNK: usize = 2048;

#[inline(always)]
unsafe fn band_in<const N: usize>(
    dst: &mut [f32],
    k: usize,
    v: *const f32,
    v_stride: isize,
    a: *const f32,
    a_rs: isize,
) {
    let mut acc = [0.0f32; N];
    for (c, out) in dst.chunks_mut(N).enumerate() {
        let len = out.len();
        let acc = &mut acc[..len];
        acc.fill(0.0);
        let col = a.add(c * N);
        let row = |i: usize| std::slice::from_raw_parts(col.offset(i as isize * a_rs), len);
        let coef = |i: usize| *v.offset(i as isize * v_stride);
        let mut i = 0;
        while i + 8 <= k {
            let r: [&[f32]; 8] = std::array::from_fn(|q| row(i + q));
            let c: [f32; 8] = std::array::from_fn(|q| coef(i + q));
            for j in 0..len {
                acc[j] = acc[j]
                    + c[0] * r[0][j]
                    + c[1] * r[1][j]
                    + c[2] * r[2][j]
                    + c[3] * r[3][j]
                    + c[4] * r[4][j]
                    + c[5] * r[5][j]
                    + c[6] * r[6][j]
                    + c[7] * r[7][j];
            }
            i += 8;
        }
        while i + 4 <= k {
            let (r0, r1, r2, r3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
            let (c0, c1, c2, c3) = (coef(i), coef(i + 1), coef(i + 2), coef(i + 3));
            for j in 0..len {
                acc[j] = acc[j] + c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j];
            }
            i += 4;
        }
        while i < k {
            let (r, c0) = (row(i), coef(i));
            for j in 0..len {
                acc[j] += c0 * r[j];
            }
            i += 1;
        }
        out.copy_from_slice(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the naive loop, bit for bit: odd sizes, more than one chunk, strided
    /// vectors, one and several threads.
    #[test]
    fn gemv_is_bit_identical_to_the_naive_loop() {
        for &(n, k, a_rs, v_stride) in &[
            (1, 1, 1, 1),
            (17, 5, 40, 3),
            (300, 77, 301, 1),
            (2 * CHUNK + 33, 129, 2 * CHUNK + 40, 2),
            (4000, 40, 4001, 1),
        ] {
            let a: Vec<f32> = (0..k * a_rs).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let v: Vec<f32> = (0..k * v_stride).map(|i| ((i * 31 % 101) as f32 - 50.0) / 13.0).collect();
            let mut want = vec![0.0f32; n];
            for (o, w) in want.iter_mut().enumerate() {
                for i in 0..k {
                    *w += v[i * v_stride] * a[i * a_rs + o];
                }
            }
            for threads in [1, 2, 3] {
                let mut got = vec![f32::NAN; n];
                // SAFETY: the vectors hold every index the call reads and writes.
                unsafe {
                    gemv_axpy(n, k, got.as_mut_ptr(), v.as_ptr(), v_stride as isize, a.as_ptr(), a_rs as isize, threads)
                };
                assert_eq!(got, want, "n {n}, k {k}, threads {threads}");
            }
        }
    }
}
