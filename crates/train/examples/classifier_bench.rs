//! Classifier + cross-entropy speed by chunk size, at Stories15M's shape (vocab 32000,
//! dim 288, batch 8 × seq 256): how `cpu_ops::DEFAULT_CLASSIFIER_CHUNK` was chosen.
//!
//!     cargo run --release -p train --example classifier_bench
//!
//! Prints, per chunk size, ms per forward + backward and the GFLOP/s of its three GEMMs
//! (logits, dx, dWcls), then each GEMM and the softmax alone for one chunk of 1024.
use std::time::Instant;

use train::cpu_ops::{softmax_cross_entropy_rows, ClassifierLoss};
use train::linalg::{matmul, matmul_acc, MatMut, MatRef};

/// Mean milliseconds of `f` over `reps` calls, after one untimed call.
fn time_ms(reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn main() {
    let (v, d, t) = (32000usize, 288usize, 2048usize);
    let x: Vec<f32> = (0..d * t).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
    let w: Vec<f32> = (0..v * d).map(|i| ((i * 104729 % 1000) as f32 / 1000.0 - 0.5) * 0.04).collect();
    let targets: Vec<u32> = (0..t).map(|i| (i * 31 % v) as u32).collect();
    let mut dx = vec![0.0; d * t];
    let mut dw = vec![0.0; v * d];
    let flops = 3.0 * 2.0 * (v * d * t) as f64;
    for chunk in [128, 256, 512, 1024, 2048] {
        let mut c = ClassifierLoss::new(v, d, chunk);
        let ms = time_ms(2, &mut || {
            c.forward_backward(&x, &w, &targets, 1.0, &mut dx, &mut dw);
        });
        println!("chunk {chunk:5}: {ms:7.1} ms  {:6.1} GFLOP/s", flops / ms / 1e6);
    }

    let n = 1024;
    let mut logits = vec![0.0f32; n * v];
    let g = 2.0 * (v * d * n) as f64;
    let ms = time_ms(4, &mut || {
        matmul(MatMut::new(&mut logits, n, v), MatRef::strided(&x, d, n, t).t(), MatRef::new(&w, v, d).t())
    });
    println!("logits [n,V]  = xᵀ Wᵀ     {ms:7.2} ms {:6.1} GFLOP/s", g / ms / 1e6);
    let ms = time_ms(4, &mut || {
        matmul_acc(MatMut::strided(&mut dx, d, n, t), MatRef::new(&w, v, d).t(), MatRef::new(&logits, n, v).t())
    });
    println!("dx     [D,n] += Wᵀ dlᵀ    {ms:7.2} ms {:6.1} GFLOP/s", g / ms / 1e6);
    let ms = time_ms(4, &mut || {
        matmul_acc(MatMut::new(&mut dw, v, d), MatRef::new(&logits, n, v).t(), MatRef::strided(&x, d, n, t).t())
    });
    println!("dWcls  [V,D] += dlᵀ xᵀ    {ms:7.2} ms {:6.1} GFLOP/s", g / ms / 1e6);
    let ms = time_ms(4, &mut || {
        softmax_cross_entropy_rows(&mut logits, &targets[..n], v, 1.0);
    });
    println!("softmax + cross-entropy  {ms:7.2} ms");
}
