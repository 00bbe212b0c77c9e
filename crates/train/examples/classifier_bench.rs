//! Classifier + cross-entropy speed by chunk size, at Stories15M's shape (vocab 32000,
//! dim 288, batch 8 × seq 256): how `cpu_ops::DEFAULT_CLASSIFIER_CHUNK` was chosen.
//!
//!     cargo run --release -p train --example classifier_bench [DIM [T]]
//!
//! (`768 1024` is Stories110M at batch 4.) Prints, per chunk size, ms per forward +
//! backward and the GFLOP/s of its three GEMMs (logits, dx, dWcls), then each GEMM, in
//! both orientations for the two gradients, the softmax alone for one chunk of 1024, and
//! the transposed `dWcls` added back once per step.
use std::time::Instant;

use train::cpu_ops::{softmax_cross_entropy_rows, ClassifierLoss};
use train::linalg::{add_assign, matmul, matmul_acc, MatMut, MatRef};

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
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("DIM and T are numbers")).collect();
    let (v, d, t) = (32000usize, args.first().copied().unwrap_or(288), args.get(1).copied().unwrap_or(2048));
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

    // The two orientations of the gradient products, chunks of 512, in turn.
    let mut both = [true, false].map(|t| ClassifierLoss::new(v, d, 512).with_transposed_gradients(t));
    let mut ms = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (c, ms) in both.iter_mut().zip(ms.iter_mut()) {
            ms.push(time_ms(1, &mut || {
                c.forward_backward(&x, &w, &targets, 1.0, &mut dx, &mut dw);
            }));
        }
    }
    let [new_ms, old_ms] = ms.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[1]
    });
    println!(
        "chunk 512: gradients transposed {new_ms:7.1} ms, as [D, n] and [V, D] {old_ms:7.1} ms (medians of 3, in turn)"
    );

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
    let mut dxt = vec![0.0f32; n * d];
    let ms = time_ms(4, &mut || matmul(MatMut::new(&mut dxt, n, d), MatRef::new(&logits, n, v), MatRef::new(&w, v, d)));
    println!("dxᵀ    [n,D]  = dl W      {ms:7.2} ms {:6.1} GFLOP/s", g / ms / 1e6);
    let mut dwt = vec![0.0f32; d * v];
    let ms = time_ms(4, &mut || {
        matmul_acc(MatMut::new(&mut dwt, d, v), MatRef::strided(&x, d, n, t), MatRef::new(&logits, n, v))
    });
    println!("dWclsᵀ [D,V] += x dl      {ms:7.2} ms {:6.1} GFLOP/s", g / ms / 1e6);
    let ms = time_ms(4, &mut || {
        softmax_cross_entropy_rows(&mut logits, &targets[..n], v, 1.0);
    });
    println!("softmax + cross-entropy  {ms:7.2} ms");
    let ms = time_ms(4, &mut || add_assign(MatMut::new(&mut dw, v, d), MatRef::new(&dwt, d, v).t()));
    println!("dWcls [V,D] += dWclsᵀ    {ms:7.2} ms (once per step)");
}
