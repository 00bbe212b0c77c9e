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
//! The products run on rayon's current thread pool (`gemm` splits the work itself and
//! stays single-threaded for small problems).
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
use gemm::Parallelism;
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
    let parallelism = match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    };
    // SAFETY: every operand's extent was checked against its slice when the view was
    // made (`check_extent`), the strides are those of the views, and `C` is borrowed
    // mutably so it cannot alias `A` or `B`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            1,
            c.ld as isize,
            alpha != 0.0,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
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

/// `C += A` for an `A` of C's shape, typically a transposed view ([`MatRef::t`]). In
/// 32 × 32 tiles, so that a transposed `A` is read a cache line at a time rather than an
/// element per line, with C's rows split between threads.
///
/// # Panics
/// If the shapes differ.
pub fn add_assign(c: MatMut<'_>, a: MatRef<'_>) {
    const TILE: usize = 32;
    assert_eq!(a.shape(), (c.rows, c.cols), "add_assign: A must be shaped like C");
    let (rows, cols, ld) = (c.rows, c.cols, c.ld);
    if rows == 0 || cols == 0 {
        return;
    }
    let (rs, cs) = a.strides();
    let needed = (rows - 1) * ld + cols;
    c.data[..needed].par_chunks_mut(TILE * ld).enumerate().for_each(|(block, chunk)| {
        simd(
            #[inline(always)]
            || {
                let i0 = block * TILE;
                let i1 = (i0 + TILE).min(rows);
                for j0 in (0..cols).step_by(TILE) {
                    let j1 = (j0 + TILE).min(cols);
                    if rs == 1 {
                        // A transposed: walk its contiguous columns.
                        for j in j0..j1 {
                            let src = &a.data[(i0 as isize + j as isize * cs) as usize..][..i1 - i0];
                            for (k, &v) in src.iter().enumerate() {
                                chunk[k * ld + j] += v;
                            }
                        }
                        continue;
                    }
                    for i in i0..i1 {
                        let row = &mut chunk[(i - i0) * ld + j0..(i - i0) * ld + j1];
                        for (j, d) in (j0..j1).zip(row) {
                            *d += a.data[(i as isize * rs + j as isize * cs) as usize];
                        }
                    }
                }
            },
        )
    });
}
