//! Matrix products for the CPU side of training, as thin wrappers over the `gemm` crate.
//!
//! Everything is f32 and row-major with an explicit leading dimension (the distance, in
//! elements, between the starts of two consecutive rows), so a block of columns inside a
//! wider matrix is a view, not a copy. That matters for the channel-major activations of
//! training: a chunk of positions `t0..t0+n` of `x: [C, T]` is the `[C, n]` view starting
//! at `x[t0]` with leading dimension `T`.
//!
//! The one primitive is [`gemm()`]: `C = alpha·C + beta·op(A)·op(B)` (the `gemm` crate's
//! convention: `alpha` scales the old `C`, `beta` the product), where `op` is the identity
//! or a transpose chosen per operand with [`MatRef::t`]. [`matmul`] (`C = A·B`) and
//! [`matmul_acc`] (`C += A·B`) cover the common cases.
//!
//! The products run on rayon's current thread pool, one band of the output per thread
//! (`device::cpu::gemm_on_threads`, as the CPU device's own; small problems stay on one
//! thread).
//!
//! ```
//! use train::linalg::{matmul, MatMut, MatRef};
//! // C[2, 2] = A[2, 3] · B[3, 2]
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let mut c = [0.0; 4];
//! matmul(MatMut::new(&mut c, 2, 2), MatRef::new(&a, 2, 3), MatRef::new(&b, 3, 2));
//! assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
//! ```

use device::cpu::simd;
use rayon::prelude::*;

/// A read-only matrix operand: a row-major `[rows, cols]` block of `data` whose element
/// `(i, j)` is `data[i * ld + j]`, possibly used transposed in a product.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    ld: usize,
    transposed: bool,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `[rows, cols]` matrix (leading dimension `cols`).
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef::strided(data, rows, cols, cols)
    }

    /// A `[rows, cols]` block whose rows start `ld` elements apart.
    ///
    /// # Panics
    /// If `ld < cols` or `data` is too short to hold the block.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> MatRef<'a> {
        check_extent(data.len(), rows, cols, ld);
        MatRef { data, rows, cols, ld, transposed: false }
    }

    /// The same storage used as its transpose: a `[rows, cols]` block becomes a
    /// `[cols, rows]` operand. No data moves.
    pub fn t(self) -> MatRef<'a> {
        MatRef { transposed: !self.transposed, ..self }
    }

    /// Shape of the operand as the product sees it (after any transpose).
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// (row stride, column stride) of the operand as the product sees it.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }
}

/// The output of a product: a row-major `[rows, cols]` block of `data` whose element
/// `(i, j)` is `data[i * ld + j]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    ld: usize,
}

impl<'a> MatMut<'a> {
    /// A dense row-major `[rows, cols]` matrix (leading dimension `cols`).
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> MatMut<'a> {
        MatMut::strided(data, rows, cols, cols)
    }

    /// A `[rows, cols]` block whose rows start `ld` elements apart.
    ///
    /// # Panics
    /// If `ld < cols` or `data` is too short to hold the block.
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> MatMut<'a> {
        check_extent(data.len(), rows, cols, ld);
        MatMut { data, rows, cols, ld }
    }
}

/// Panics unless a `[rows, cols]` block with leading dimension `ld` fits in `len` elements.
fn check_extent(len: usize, rows: usize, cols: usize, ld: usize) {
    assert!(ld >= cols, "leading dimension {ld} is smaller than the {cols} columns");
    let needed = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols };
    assert!(len >= needed, "a [{rows}, {cols}] block with leading dimension {ld} needs {needed} elements, got {len}");
}

/// `C = alpha·C + beta·op(A)·op(B)`, with `op(A): [m, k]`, `op(B): [k, n]`, `C: [m, n]`.
///
/// When `alpha == 0` the old contents of `C` are not read at all (so they may be
/// uninitialised garbage or NaN), as in BLAS.
///
/// # Panics
/// If the shapes do not agree.
pub fn gemm(c: MatMut<'_>, alpha: f32, beta: f32, a: MatRef<'_>, b: MatRef<'_>) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert_eq!(k, k2, "inner dimensions differ: op(A) is [{m}, {k}], op(B) is [{k2}, {n}]");
    assert_eq!((c.rows, c.cols), (m, n), "C is [{}, {}] but op(A)·op(B) is [{m}, {n}]", c.rows, c.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: only the scaling of C remains (and `gemm` would not touch C).
        for row in c.data.chunks_mut(c.ld).take(m) {
            for value in &mut row[..n] {
                *value = if alpha == 0.0 { 0.0 } else { alpha * *value };
            }
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    // SAFETY: every operand's extent was checked against its slice when the view was
    // made (`check_extent`), the strides are those of the views, and `C` is borrowed
    // mutably so it cannot alias `A` or `B`.
    unsafe {
        device::cpu::gemm_on_threads(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.ld as isize,
            alpha,
            beta,
            a.data.as_ptr(),
            a_rs,
            a_cs,
            b.data.as_ptr(),
            b_rs,
            b_cs,
            rayon::current_num_threads(),
        );
    }
}

/// `C = A·B` (any old contents of `C` are overwritten without being read).
pub fn matmul(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>) {
    gemm(c, 0.0, 1.0, a, b);
}

/// `C += A·B`, the form every weight-gradient product takes.
pub fn matmul_acc(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>) {
    gemm(c, 1.0, 1.0, a, b);
}

/// `C += A` for an `A` of C's shape, typically a transposed view ([`MatRef::t`]). C's
/// rows are split between threads in blocks of 32; a transposed `A` is added 8 × 8 tile
/// by tile ([`transpose_block`]), so that both are read a cache line at a time.
///
/// # Panics
/// If the shapes differ.
pub fn add_assign(c: MatMut<'_>, a: MatRef<'_>) {
    const ROWS: usize = 32;
    assert_eq!(a.shape(), (c.rows, c.cols), "add_assign: A must be shaped like C");
    let (rows, cols, ld) = (c.rows, c.cols, c.ld);
    if rows == 0 || cols == 0 {
        return;
    }
    let (rs, cs) = a.strides();
    let needed = (rows - 1) * ld + cols;
    c.data[..needed].par_chunks_mut(ROWS * ld).enumerate().for_each(|(block, chunk)| {
        let i0 = block * ROWS;
        let i1 = (i0 + ROWS).min(rows);
        if rs == 1 {
            // A transposed: its columns are contiguous rows of `a.data`, `cs` apart.
            transpose_block::<true>(&a.data[i0..], cs as usize, chunk, ld, cols, i1 - i0);
            return;
        }
        simd(
            #[inline(always)]
            || {
                for i in i0..i1 {
                    let row = &mut chunk[(i - i0) * ld..(i - i0) * ld + cols];
                    for (j, d) in row.iter_mut().enumerate() {
                        *d += a.data[(i as isize * rs + j as isize * cs) as usize];
                    }
                }
            },
        )
    });
}

/// `dst[c·dst_ld + r] = src[r·src_ld + c]` (with `ADD`, `+=`) for `r < rows`, `c < cols`:
/// a `rows × cols` block of `src` written transposed into `dst`.
///
/// In 8 × 8 tiles transposed in AVX registers where the CPU has AVX, element by element at
/// the edges and elsewhere. Written by hand because the compiler does not vectorise a
/// scalar tile transpose (a plain-Rust 8 × 8 tile measured 2–3× slower than this on a
/// 768 × 2048 weight) and the transpose crates write only into a contiguous destination,
/// not into a block of a wider matrix.
///
/// # Panics
/// If either block runs past its slice.
pub fn transpose_block<const ADD: bool>(
    src: &[f32],
    src_ld: usize,
    dst: &mut [f32],
    dst_ld: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_ld + cols <= src.len(), "transpose_block: the source block runs past its slice");
    assert!((cols - 1) * dst_ld + rows <= dst.len(), "transpose_block: the destination block runs past its slice");
    let mut done = (0, 0); // rows and columns covered by whole tiles
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        let (tr, tc) = (rows / 8 * 8, cols / 8 * 8);
        for r in (0..tr).step_by(8) {
            for c in (0..tc).step_by(8) {
                // SAFETY: AVX was detected; the tile lies inside both blocks, which the
                // asserts above put inside the slices.
                unsafe {
                    tile8::<ADD>(src.as_ptr().add(r * src_ld + c), src_ld, dst.as_mut_ptr().add(c * dst_ld + r), dst_ld)
                };
            }
        }
        done = (tr, tc);
    }
    let one = |dst: &mut [f32], r: usize, c: usize| {
        let (v, d) = (src[r * src_ld + c], &mut dst[c * dst_ld + r]);
        *d = if ADD { *d + v } else { v };
    };
    // The rows below the tiles, then the columns right of them.
    for r in done.0..rows {
        (0..cols).for_each(|c| one(dst, r, c));
    }
    for r in 0..done.0 {
        (done.1..cols).for_each(|c| one(dst, r, c));
    }
}

/// One 8 × 8 tile of [`transpose_block`]: eight rows loaded, transposed with unpacks,
/// shuffles and lane permutes, stored (or added) as eight rows.
///
/// # Safety
/// The CPU has AVX; the eight rows of eight at `src` (`src_ld` apart) and at `dst`
/// (`dst_ld` apart) are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn tile8<const ADD: bool>(src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
    use std::arch::x86_64::*;
    let row = |i: usize| _mm256_loadu_ps(src.add(i * src_ld));
    let (r0, r1, r2, r3, r4, r5, r6, r7) = (row(0), row(1), row(2), row(3), row(4), row(5), row(6), row(7));
    // Pairs of rows interleaved, then quads, then the 128-bit halves exchanged.
    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
    let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
    let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
    let (u0, u1) = (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xEE>(t0, t2));
    let (u2, u3) = (_mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xEE>(t1, t3));
    let (u4, u5) = (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xEE>(t4, t6));
    let (u6, u7) = (_mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xEE>(t5, t7));
    let cols = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (c, v) in cols.into_iter().enumerate() {
        let at = dst.add(c * dst_ld);
        let v = if ADD { _mm256_add_ps(_mm256_loadu_ps(at), v) } else { v };
        _mm256_storeu_ps(at, v);
    }
}
