//! `device::cpu::gemm_on_threads`: the product cut into one band per thread. Every band
//! must agree bit for bit with the whole product on one thread (each element's sum is
//! formed in the same order), and both with a naive f64 reference.

use device::cpu::gemm_on_threads;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `alpha·c + beta·a·b` in f64, with `a` read through `(rs, cs)` strides.
#[allow(clippy::too_many_arguments)]
fn reference(
    m: usize,
    n: usize,
    k: usize,
    c: &[f32],
    alpha: f32,
    beta: f32,
    a: &[f32],
    a_s: (usize, usize),
    b: &[f32],
) -> Vec<f64> {
    (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            let dot: f64 = (0..k).map(|l| f64::from(a[i * a_s.0 + l * a_s.1]) * f64::from(b[l * n + j])).sum();
            f64::from(alpha) * f64::from(c[e]) + f64::from(beta) * dot
        })
        .collect()
}

#[test]
fn bands_agree_bit_for_bit_with_one_thread_and_with_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // Long side rows and long side columns, ragged band edges, a transposed left
    // operand, accumulation; the last shape is too small to be cut.
    let cases =
        [(100, 37, 300, false, 0.0), (40, 130, 257, true, 0.0), (256, 96, 64, false, 1.0), (16, 8, 64, true, 1.0)];
    for (m, n, k, transposed, alpha) in cases {
        let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        // `a` holds op(A) [m, k] row-major, or its transpose [k, m] row-major.
        let (a_rs, a_cs) = if transposed { (1, m) } else { (k, 1) };
        let run = |threads: usize| {
            let mut c = c0.clone();
            // SAFETY: the three buffers hold the [m, k], [k, n] and [m, n] matrices the
            // strides describe, and `c` is a separate allocation.
            unsafe {
                gemm_on_threads(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    n as isize,
                    alpha,
                    0.5,
                    a.as_ptr(),
                    a_rs as isize,
                    a_cs as isize,
                    b.as_ptr(),
                    n as isize,
                    1,
                    threads,
                )
            };
            c
        };
        let one = run(1);
        for threads in [2, 3] {
            let bands = run(threads);
            let differ = one.iter().zip(&bands).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(differ, 0, "{m}x{n}x{k} on {threads} threads: {differ} elements differ from one thread");
        }
        // f32 sums of k products of magnitude < 1: a few k·ε of error at most.
        let want = reference(m, n, k, &c0, alpha, 0.5, &a, (a_rs, a_cs), &b);
        for (e, (&got, &want)) in one.iter().zip(&want).enumerate() {
            assert!((f64::from(got) - want).abs() < 1e-5 * k as f64, "{m}x{n}x{k}: element {e} is {got}, want {want}");
        }
    }
}
