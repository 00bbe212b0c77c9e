//! `linalg::gemm` against a naive triple loop in f64, over every transpose combination,
//! strided views, and the alpha/beta scalings.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::linalg::{add_assign, gemm, matmul, matmul_acc, transpose_block, MatMut, MatRef};

/// Element (i, j) of a stored `[rows, ld]`-strided matrix, optionally transposed.
fn at(data: &[f32], ld: usize, transposed: bool, i: usize, j: usize) -> f64 {
    let (r, c) = if transposed { (j, i) } else { (i, j) };
    f64::from(data[r * ld + c])
}

#[test]
fn gemm_matches_naive_for_every_transpose_and_stride() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Sizes above gemm's small-matrix paths so the blocked, threaded kernels run too.
    for &(m, n, k) in &[(3, 5, 4), (70, 33, 129), (1, 300, 2)] {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                // Stored shapes, padded by 3 columns of junk so the views are strided.
                let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
                let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (a_cols + 3, b_cols + 3, n + 3);
                let a: Vec<f32> = (0..a_rows * lda).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..b_rows * ldb).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let c0: Vec<f32> = (0..m * ldc).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let (alpha, beta) = (0.5f32, -2.0f32);

                let mut c = c0.clone();
                let mut a_view = MatRef::strided(&a, a_rows, a_cols, lda);
                if trans_a {
                    a_view = a_view.t();
                }
                let mut b_view = MatRef::strided(&b, b_rows, b_cols, ldb);
                if trans_b {
                    b_view = b_view.t();
                }
                gemm(MatMut::strided(&mut c, m, n, ldc), alpha, beta, a_view, b_view);

                for i in 0..m {
                    for j in 0..ldc {
                        let got = f64::from(c[i * ldc + j]);
                        let want = if j < n {
                            let dot: f64 =
                                (0..k).map(|p| at(&a, lda, trans_a, i, p) * at(&b, ldb, trans_b, p, j)).sum();
                            f64::from(alpha) * f64::from(c0[i * ldc + j]) + f64::from(beta) * dot
                        } else {
                            // Padding outside the view must be untouched.
                            f64::from(c0[i * ldc + j])
                        };
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "m={m} n={n} k={k} ta={trans_a} tb={trans_b} C[{i},{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_ignores_old_contents_and_matmul_acc_adds() {
    let a = [1.0, 2.0, 3.0, 4.0]; // [2, 2]
    let b = [5.0, 6.0, 7.0, 8.0]; // [2, 2]
    let mut c = [f32::NAN; 4];
    matmul(MatMut::new(&mut c, 2, 2), MatRef::new(&a, 2, 2), MatRef::new(&b, 2, 2));
    assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
    matmul_acc(MatMut::new(&mut c, 2, 2), MatRef::new(&a, 2, 2).t(), MatRef::new(&b, 2, 2));
    // Aᵀ·B = [[26, 30], [38, 44]]
    assert_eq!(c, [45.0, 52.0, 81.0, 94.0]);
}

#[test]
fn empty_inner_dimension_only_scales_c() {
    let mut c = [1.0f32, 2.0];
    gemm(MatMut::new(&mut c, 1, 2), 3.0, 1.0, MatRef::new(&[], 1, 0), MatRef::new(&[], 0, 2));
    assert_eq!(c, [3.0, 6.0]);
}

#[test]
fn add_assign_adds_plain_and_transposed_views_into_strided_blocks() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Several 32-row tiles plus a partial one, and a partial column tile.
    for &(rows, cols) in &[(1, 1), (70, 45), (33, 100)] {
        for transposed in [false, true] {
            let (a_rows, a_cols) = if transposed { (cols, rows) } else { (rows, cols) };
            let lda = a_cols + 2;
            let ldc = cols + 5;
            let a: Vec<f32> = (0..a_rows * lda).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let c0: Vec<f32> = (0..rows * ldc).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut c = c0.clone();
            let view = MatRef::strided(&a, a_rows, a_cols, lda);
            add_assign(MatMut::strided(&mut c, rows, cols, ldc), if transposed { view.t() } else { view });
            for i in 0..rows {
                for j in 0..ldc {
                    let want =
                        if j < cols { c0[i * ldc + j] + at(&a, lda, transposed, i, j) as f32 } else { c0[i * ldc + j] };
                    assert_eq!(c[i * ldc + j], want, "{rows}x{cols} transposed {transposed} at ({i}, {j})");
                }
            }
        }
    }
}

/// The 8 × 8 register tiles and the element-by-element edges against the definition,
/// written and added, with strided blocks whose neighbours must be left alone.
#[test]
fn transpose_block_writes_and_adds_the_transpose_and_nothing_else() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for &(rows, cols) in &[(1, 1), (8, 8), (16, 24), (13, 21), (7, 40), (40, 7), (0, 5)] {
        let (src_ld, dst_ld) = (cols + 3, rows + 5);
        let src: Vec<f32> = (0..rows * src_ld).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let dst0: Vec<f32> = (0..(cols + 1) * dst_ld).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for add in [false, true] {
            let mut dst = dst0.clone();
            if add {
                transpose_block::<true>(&src, src_ld, &mut dst, dst_ld, rows, cols);
            } else {
                transpose_block::<false>(&src, src_ld, &mut dst, dst_ld, rows, cols);
            }
            for (e, (&got, &old)) in dst.iter().zip(&dst0).enumerate() {
                let (c, r) = (e / dst_ld, e % dst_ld);
                let want = match (r < rows && c < cols, add) {
                    (false, _) => old,
                    (true, false) => src[r * src_ld + c],
                    (true, true) => old + src[r * src_ld + c],
                };
                assert_eq!(got, want, "{rows}x{cols} add {add}: destination row {c}, column {r}");
            }
        }
    }
}
