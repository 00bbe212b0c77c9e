//! `anetrain bench gemm`: how close the CPU device's linear layers come to the best GEMM
//! this machine runs, and what one op costs to dispatch.
//!
//! For each transformer shape — `x: [1, C_in, 1, S]`, `W: [C_out, C_in]` — it times:
//! - `matmul` as the dynamic-weight pipeline writes it: one input surface
//!   `[1, C_in, 1, S + C_out]` (padded as [`padded_width`] says) holding the activations
//!   and `Wᵀ`, sliced, reshaped and multiplied with `transpose_x` (all views: no copy
//!   before the GEMM);
//! - a 1×1 `conv` with the weights baked in as a BLOBFILE constant;
//! - the `gemm` crate called directly on packed `W · x`, same threads, same process:
//!   both with the crate's own threading and split into one band per thread as the
//!   device does (see `linalg::gemm_on_threads`); the faster of the two is the reference.

use std::time::{Duration, Instant};

use gemm::Parallelism;
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType};

use super::linalg::gemm_into;
use super::CpuDevice;
use crate::{padded_width, Device, Precision, Surface, Weights};

/// What to measure.
#[derive(Clone, Debug)]
pub struct GemmBenchConfig {
    /// Threads for the device and for the direct GEMM.
    pub threads: usize,
    /// Sequence lengths S (positions per surface) to measure each shape at.
    pub seqs: Vec<usize>,
    /// Wall time spent timing each case (after warm-up).
    pub time_per_case: Duration,
    pub precision: Precision,
    /// `(dim, hidden)` model widths; each gives the shapes dim→dim, dim→hidden, hidden→dim.
    pub widths: Vec<(usize, usize)>,
}

impl Default for GemmBenchConfig {
    fn default() -> GemmBenchConfig {
        GemmBenchConfig {
            threads: rayon::current_num_threads(),
            seqs: vec![256],
            time_per_case: Duration::from_millis(500),
            precision: Precision::Fp32,
            // Stories110M (dim 768, hidden 2048) and Stories15M (dim 288, hidden 768).
            widths: vec![(768, 2048), (288, 768)],
        }
    }
}

/// Which path a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmBenchOp {
    /// `matmul` on a dynamic-weight surface (slice → reshape → matmul, as views).
    Matmul,
    /// 1×1 `conv` with baked weights.
    Conv1x1,
    /// One `relu` on a single element: the fixed cost of an op (`device_us`).
    Dispatch,
}

impl GemmBenchOp {
    pub fn name(self) -> &'static str {
        match self {
            GemmBenchOp::Matmul => "matmul",
            GemmBenchOp::Conv1x1 => "conv 1x1",
            GemmBenchOp::Dispatch => "dispatch",
        }
    }
}

/// One measured case. Times are medians per evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmBenchRow {
    pub op: GemmBenchOp,
    pub c_in: usize,
    pub c_out: usize,
    pub seq: usize,
    pub device_us: f64,
    /// The direct GEMM on the same shape, packed: the faster of the `gemm` crate's own
    /// threading and the device's bands (0 for [`GemmBenchOp::Dispatch`]).
    pub direct_us: f64,
    pub device_gflops: f64,
    pub direct_gflops: f64,
    /// `device_gflops / direct_gflops` (1.0 = as fast as the bare GEMM).
    pub ratio: f64,
    /// The `gemm` crate called directly, in the device's bands, on the operands as the
    /// device reads them (for `matmul`: `Wᵀ` and `x` in place in the dynamic-weight
    /// surface, a transposed product whose weight panel `gemm` must pack on every call;
    /// for `conv`: the packed operands). The device's own overhead is
    /// `device_us − layout_us`.
    pub layout_us: f64,
    pub layout_gflops: f64,
    /// The largest difference between the device's output and the direct GEMM's on the
    /// same operands (for `conv`: with `W` rounded to fp16, as its BLOBFILE holds it), in
    /// units of the output's largest magnitude: a check that the figures time the right
    /// product (0 for [`GemmBenchOp::Dispatch`]).
    pub max_error: f64,
}

/// Median times of several functions over `budget` of wall time, run in turn (a, b, c,
/// a, b, c, …) so that all see the same machine load (at least 3 runs each, after one
/// warm-up each).
fn median_times(budget: Duration, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    fs.iter_mut().for_each(|f| f());
    let start = Instant::now();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    while times[0].len() < 3 || (start.elapsed() < budget && times[0].len() < 1_000_000) {
        for (f, t) in fs.iter_mut().zip(times.iter_mut()) {
            let at = Instant::now();
            f();
            t.push(at.elapsed().as_secs_f64());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// Deterministic values in [-1, 1) (no RNG dependency in the library; also the CPU
/// device's unit tests' inputs).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub(crate) fn matmul_program(c_in: usize, c_out: usize, seq: usize) -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let xw = b.input("xw", TensorType::surface(DType::Fp32, c_in, padded_width(seq + c_out)));
    let (ci, co, s) = (c_in as i64, c_out as i64, seq as i64);
    let x = b.slice_by_size("x", &xw, &[0, 0, 0, 0], &[1, ci, 1, s]);
    let x = b.reshape("x2", &x, &[ci, s]);
    let w = b.slice_by_size("w", &xw, &[0, 0, 0, s], &[1, ci, 1, co]);
    let w = b.reshape("w2", &w, &[ci, co]);
    let y = b.matmul("y", &w, &x, true, false); // [C_out, S]
    let y = b.reshape("out", &y, &[1, co, 1, s]);
    b.output(&y);
    Program::new(Dialect::Ios18, b.finish().expect("the benchmark program is valid"))
}

/// A 1×1 conv with `w: [C_out, C_in]` baked in (rounded to fp16 by the BLOBFILE).
pub(crate) fn conv_program(c_in: usize, c_out: usize, seq: usize, w: &[f32], weights: &mut Weights) -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp32, c_in, seq));
    let w = weights.add_tensor("w", &[c_out, c_in, 1, 1], w);
    let w = b.constant("w", w);
    let w = b.cast("w32", &w, DType::Fp32);
    let y = b.conv1x1("out", &x, &w);
    b.output(&y);
    Program::new(Dialect::Ios18, b.finish().expect("the benchmark program is valid"))
}

/// Runs the benchmark. Takes roughly `time_per_case` × (one per shape and length + 1).
pub fn bench_gemm(cfg: &GemmBenchConfig) -> Vec<GemmBenchRow> {
    let device = CpuDevice::new(cfg.precision).with_threads(cfg.threads);
    let mut rows = Vec::new();
    let shapes = cfg.widths.iter().flat_map(|&(dim, hidden)| [(dim, dim), (dim, hidden), (hidden, dim)]);
    for (seq, (c_in, c_out)) in cfg.seqs.iter().flat_map(|&seq| shapes.clone().map(move |shape| (seq, shape))) {
        let flops = 2.0 * (c_in * c_out * seq) as f64;
        // The direct GEMM: out[C_out, S] = W[C_out, C_in] · x[C_in, S], all packed; with
        // the crate's threading, then in the device's bands. Each on its own copy of the
        // operands, so that neither finds them in cache from the other's run (the other
        // cases' operands were last touched a whole round ago too).
        let w = values(c_out * c_in, 1);
        let x = values(c_in * seq, 2);
        let (w2, x2) = (w.clone(), x.clone());
        let mut out = vec![0f32; c_out * seq];
        let mut out2 = out.clone();
        let mut direct_crate = || unsafe {
            let par = if cfg.threads > 1 { Parallelism::Rayon(cfg.threads) } else { Parallelism::None };
            gemm::gemm(
                c_out,
                seq,
                c_in,
                out.as_mut_ptr(),
                1,
                seq as isize,
                false,
                w.as_ptr(),
                1,
                c_in as isize,
                x.as_ptr(),
                1,
                seq as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        };
        let mut direct_bands = || unsafe {
            gemm_into(
                c_out,
                seq,
                c_in,
                out2.as_mut_ptr(),
                seq as isize,
                w2.as_ptr(),
                c_in as isize,
                1,
                x2.as_ptr(),
                seq as isize,
                1,
                cfg.threads,
            )
        };

        let program = matmul_program(c_in, c_out, seq);
        let mut mm_kernel = device.compile(&program, &Weights::new()).expect("the benchmark program compiles");
        let mut mm_input = Surface::activation(DType::Fp32, c_in, padded_width(seq + c_out));
        mm_input.write_block(0, 0, c_in, seq, &x);
        let w_t: Vec<f32> = (0..c_in * c_out).map(|i| w[(i % c_out) * c_in + i / c_out]).collect();
        mm_input.write_block(0, seq, c_in, c_out, &w_t);
        let mut mm_output = Surface::activation(DType::Fp32, c_out, seq);
        let mut matmul = || mm_kernel.eval(&[&mm_input], &mut [&mut mm_output]).expect("the benchmark kernel runs");
        // The same product on the surface's memory, without the device.
        let surface = mm_input.as_f32().expect("an fp32 surface").as_ptr() as usize;
        let ld = padded_width(seq + c_out) as isize;
        let mut layout_out = vec![0f32; c_out * seq];
        let mut layout = || unsafe {
            let base = surface as *const f32;
            gemm_into(
                c_out,
                seq,
                c_in,
                layout_out.as_mut_ptr(),
                seq as isize,
                base.add(seq),
                1,
                ld,
                base,
                ld,
                1,
                cfg.threads,
            )
        };

        let mut weights = Weights::new();
        let program = conv_program(c_in, c_out, seq, &w, &mut weights);
        let mut conv_kernel = device.compile(&program, &weights).expect("the benchmark program compiles");
        let conv_input = Surface::from_f32(DType::Fp32, &[1, c_in, 1, seq], &x);
        let mut conv_output = Surface::activation(DType::Fp32, c_out, seq);
        let mut conv = || conv_kernel.eval(&[&conv_input], &mut [&mut conv_output]).expect("the benchmark kernel runs");

        let t = median_times(
            cfg.time_per_case,
            &mut [&mut direct_crate, &mut direct_bands, &mut matmul, &mut conv, &mut layout],
        );
        let direct = t[0].min(t[1]);
        // The checks, after the timing: each device output against the direct GEMM.
        let mm_error = max_error(&mm_output.to_f32(), &out2);
        let w16: Vec<f32> = w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let mut conv_want = vec![0f32; c_out * seq];
        unsafe {
            gemm_into(
                c_out,
                seq,
                c_in,
                conv_want.as_mut_ptr(),
                seq as isize,
                w16.as_ptr(),
                c_in as isize,
                1,
                x.as_ptr(),
                seq as isize,
                1,
                1,
            )
        };
        let conv_error = max_error(&conv_output.to_f32(), &conv_want);
        rows.push(row(GemmBenchOp::Matmul, c_in, c_out, seq, t[2], direct, t[4], flops, mm_error));
        rows.push(row(GemmBenchOp::Conv1x1, c_in, c_out, seq, t[3], direct, t[1], flops, conv_error));
    }
    rows.push(dispatch_row(&device, cfg.time_per_case));
    rows
}

#[allow(clippy::too_many_arguments)]
fn row(
    op: GemmBenchOp,
    c_in: usize,
    c_out: usize,
    seq: usize,
    device_s: f64,
    direct_s: f64,
    layout_s: f64,
    flops: f64,
    max_error: f64,
) -> GemmBenchRow {
    let (device_gflops, direct_gflops) = (flops / device_s / 1e9, flops / direct_s / 1e9);
    GemmBenchRow {
        op,
        c_in,
        c_out,
        seq,
        device_us: device_s * 1e6,
        direct_us: direct_s * 1e6,
        device_gflops,
        direct_gflops,
        ratio: device_gflops / direct_gflops,
        layout_us: layout_s * 1e6,
        layout_gflops: flops / layout_s / 1e9,
        max_error,
    }
}

/// `max |got − want|` over `max |want|`.
fn max_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "the benchmark compares outputs of one shape");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) as f64 / scale as f64
}

fn dispatch_row(device: &CpuDevice, budget: Duration) -> GemmBenchRow {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::new(DType::Fp32, [1, 1, 1, 1]));
    let y = b.relu("y", &x);
    b.output(&y);
    let program = Program::new(Dialect::Ios18, b.finish().expect("the benchmark program is valid"));
    let mut kernel = device.compile(&program, &Weights::new()).expect("the benchmark program compiles");
    let input = Surface::from_f32(DType::Fp32, &[1, 1, 1, 1], &[-1.5]);
    let mut output = Surface::zeros(DType::Fp32, &[1, 1, 1, 1]);
    // Many evals per sample: one is far below the clock's resolution.
    const EVALS: usize = 1000;
    let mut evals = || {
        for _ in 0..EVALS {
            kernel.eval(&[&input], &mut [&mut output]).expect("the benchmark kernel runs");
        }
    };
    let t = median_times(budget, &mut [&mut evals])[0] / EVALS as f64;
    GemmBenchRow {
        op: GemmBenchOp::Dispatch,
        c_in: 1,
        c_out: 1,
        seq: 1,
        device_us: t * 1e6,
        direct_us: 0.0,
        device_gflops: 0.0,
        direct_gflops: 0.0,
        ratio: 0.0,
        layout_us: 0.0,
        layout_gflops: 0.0,
        max_error: 0.0,
    }
}

/// The rows as a plain-text table. `gemm GF/s` is the bare GEMM on packed `W·x`;
/// `layout GF/s` the bare GEMM on the operands as the device reads them.
pub fn format_gemm_bench(rows: &[GemmBenchRow]) -> String {
    let mut s = format!(
        "{:<9} {:>22} {:>10} {:>10} {:>12} {:>10} {:>7} {:>11}\n",
        "op", "x[C_in,S]·W[C_out,C_in]", "device µs", "gemm µs", "device GF/s", "gemm GF/s", "ratio", "layout GF/s"
    );
    for r in rows {
        if r.op == GemmBenchOp::Dispatch {
            s.push_str(&format!(
                "{:<9} {:>22} {:>10.3} {:>10} {:>12} {:>10} {:>7} {:>11}\n",
                r.op.name(),
                "1 element (relu)",
                r.device_us,
                "-",
                "-",
                "-",
                "-",
                "-"
            ));
        } else {
            let shape = format!("[{}x{}]·[{}x{}]", r.c_in, r.seq, r.c_out, r.c_in);
            s.push_str(&format!(
                "{:<9} {:>22} {:>10.1} {:>10.1} {:>12.1} {:>10.1} {:>6.0}% {:>11.1}\n",
                r.op.name(),
                shape,
                r.device_us,
                r.direct_us,
                r.device_gflops,
                r.direct_gflops,
                r.ratio * 100.0,
                r.layout_gflops
            ));
        }
    }
    // The spread of the ratio per op, the figure to read first.
    let spread = |op: GemmBenchOp| {
        let ratios = rows.iter().filter(|r| r.op == op).map(|r| r.ratio * 100.0);
        let (lo, hi) = ratios.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| (lo.min(r), hi.max(r)));
        (lo <= hi).then(|| format!("{} {lo:.0}–{hi:.0} %", op.name()))
    };
    let spreads: Vec<String> = [GemmBenchOp::Matmul, GemmBenchOp::Conv1x1].into_iter().filter_map(spread).collect();
    if !spreads.is_empty() {
        s.push_str(&format!("device / direct GEMM: {}\n", spreads.join(", ")));
    }
    // fp32 products of the same operands, summed in another order at most: a relative
    // error far above 1e-5 means a case timed the wrong product.
    let products = rows.iter().filter(|r| r.op != GemmBenchOp::Dispatch);
    if let Some(w) = products.max_by(|a, b| a.max_error.total_cmp(&b.max_error)) {
        let verdict = if w.max_error <= 1e-4 { "every output matches" } else { "OUTPUTS DIFFER from" };
        s.push_str(&format!(
            "check: {verdict} the direct GEMM's on the same operands (largest difference {:.1e} of the largest value, {} [{}x{}]·[{}x{}])\n",
            w.max_error,
            w.op.name(),
            w.c_in,
            w.seq,
            w.c_out,
            w.c_in
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_is_measured_at_every_length_then_dispatch() {
        let cfg = GemmBenchConfig {
            threads: 2,
            seqs: vec![8, 24],
            time_per_case: Duration::from_millis(1),
            precision: Precision::Fp32,
            widths: vec![(16, 32)],
        };
        let rows = bench_gemm(&cfg);
        let shapes: Vec<_> = rows.iter().map(|r| (r.op, r.seq, r.c_in, r.c_out)).collect();
        let mut expected = Vec::new();
        for seq in [8, 24] {
            for (c_in, c_out) in [(16, 16), (16, 32), (32, 16)] {
                expected.push((GemmBenchOp::Matmul, seq, c_in, c_out));
                expected.push((GemmBenchOp::Conv1x1, seq, c_in, c_out));
            }
        }
        assert_eq!(shapes[..12], expected[..]);
        assert_eq!(rows[12].op, GemmBenchOp::Dispatch);
        for r in &rows[..12] {
            let flops = 2.0 * (r.c_in * r.c_out * r.seq) as f64;
            assert!(r.device_us > 0.0 && r.direct_us > 0.0, "{r:?}");
            assert!((r.device_gflops - flops / r.device_us / 1e3).abs() < 1e-9 * r.device_gflops, "{r:?}");
            assert!((r.ratio - r.direct_us / r.device_us).abs() < 1e-9, "{r:?}");
            // fp32 sums of at most 32 products, in another order at most.
            assert!(r.max_error < 1e-5, "the device computed another product: {r:?}");
        }
        let table = format_gemm_bench(&rows);
        assert!(table.contains("[16x24]·[32x16]"), "{table}");
        assert_eq!(table.lines().count(), 16, "{table}");
        let (lo, hi) = rows[..12]
            .iter()
            .filter(|r| r.op == GemmBenchOp::Conv1x1)
            .fold((f64::INFINITY, 0f64), |(lo, hi), r| (lo.min(r.ratio * 100.0), hi.max(r.ratio * 100.0)));
        assert!(table.contains(&format!("conv 1x1 {lo:.0}–{hi:.0} %")), "{table}");
        assert!(table.lines().last().unwrap().starts_with("check: every output matches"), "{table}");
    }
}
