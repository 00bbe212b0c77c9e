//! `tiny_train`: the first demonstration of the ANE training seeds, on any machine.
//!
//! A 2-layer network `y = W2 · relu(W1 · x)` learns to imitate a fixed "teacher" network
//! of the same shape, with a mean-squared-error loss. Forward and backward run as device
//! kernels with the weights **baked in** (BLOBFILE constants), so every optimizer step
//! needs new kernels — and a background thread compiles them while the current ones
//! keep training (double-buffered compilation, one step stale; see
//! `train::double_buffer`). The same run is done twice, recompiling on the critical path
//! and in the background, and each prints the Efficiency Report of the big trainer.
//!
//! ```text
//! cargo run --release -p train --example tiny_train
//! ```
//!
//! The CPU device stands in for the ANE; [`SIM_COMPILE_MS`] makes each of its compiles
//! take as long as a small ANE compile, so the overlap shows.

use std::time::Instant;

use device::{cpu::CpuDevice, Device, Kernel, Precision, Surface};
use mil::blob::Weights;
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::linalg::{matmul_acc, MatMut, MatRef};
use train::optim::{AdamW, AdamWConfig};
use train::telemetry::{Cumulative, Report};

/// Input, hidden and output widths.
const IN: usize = 256;
const HID: usize = 512;
const OUT: usize = 128;
/// Examples per step (the spatial width of every surface).
const BATCH: usize = 2048;
const STEPS: u64 = 40;
const LR: f32 = 3e-3;
/// Emulated compile latency per kernel: small ANE programs take tens of milliseconds to
/// compile (DESIGN.md); the CPU device compiles these in well under one.
const SIM_COMPILE_MS: u64 = 10;

/// A builder for fp32-surface programs that compute in fp16 inside (ios18, M3+).
struct Gen {
    b: FunctionBuilder,
    weights: Weights,
}

impl Gen {
    fn new() -> Gen {
        Gen { b: FunctionBuilder::new("main", Dialect::Ios18), weights: Weights::new() }
    }

    /// An fp32 input surface `[1, C, 1, BATCH]` as an fp16 `[C, BATCH]` value.
    fn input(&mut self, name: &str, channels: usize) -> Var {
        let x = self.b.input(name, TensorType::surface(DType::Fp32, channels, BATCH));
        let h = self.b.cast(&format!("{name}_h"), &x, DType::Fp16);
        self.b.reshape(&format!("{name}_2"), &h, &[channels as i64, BATCH as i64])
    }

    /// A weight matrix `[rows, cols]` baked into the program.
    fn weight(&mut self, name: &str, rows: usize, cols: usize, data: &[f32]) -> Var {
        let blob = self.weights.add_tensor(name, &[rows, cols], data);
        self.b.constant(name, blob)
    }

    /// A `[C, BATCH]` value as an fp32 output surface.
    fn output(&mut self, name: &str, v: &Var) {
        let c = v.ty.shape[0] as i64;
        let r = self.b.reshape(&format!("{name}_4"), v, &[1, c, 1, BATCH as i64]);
        let o = self.b.cast(name, &r, DType::Fp32);
        self.b.output(&o);
    }

    /// Compiles the program, refusing it if the ANE lint finds an error in it (what the
    /// ANE is known to reject should fail here, not on a Mac).
    fn compile(self, device: &dyn Device) -> device::Result<Box<dyn Kernel>> {
        let program = Program::new(Dialect::Ios18, self.b.finish()?);
        let errors: Vec<String> = mil::lint::lint(&program)
            .into_iter()
            .filter(|f| f.severity == mil::lint::Severity::Error)
            .map(|f| f.to_string())
            .collect();
        if !errors.is_empty() {
            return Err(device::Error::new(device::ErrorKind::Program, errors.join("; ")));
        }
        device.compile(&program, &self.weights)
    }
}

/// The two kernels of one version of the weights.
struct Kernels {
    /// `x [IN] → h = relu(W1·x) [HID], y = W2·h [OUT]`.
    forward: Box<dyn Kernel>,
    /// `dy [OUT], mask [HID] → dz = (W2ᵀ·dy) ⊙ mask [HID]`, the gradient at `W1·x`.
    backward: Box<dyn Kernel>,
    seconds: f64,
}

/// The parameters, one flat vector: `W1 [HID, IN]` then `W2 [OUT, HID]`.
fn w1(p: &[f32]) -> &[f32] {
    &p[..HID * IN]
}
fn w2(p: &[f32]) -> &[f32] {
    &p[HID * IN..]
}

fn compile(device: &dyn Device, p: &[f32]) -> device::Result<Kernels> {
    let start = Instant::now();
    let mut g = Gen::new();
    let x = g.input("x", IN);
    let w1 = g.weight("w1", HID, IN, w1(p));
    let z = g.b.matmul("z", &w1, &x, false, false);
    let h = g.b.relu("h2", &z);
    let w2v = g.weight("w2", OUT, HID, w2(p));
    let y = g.b.matmul("y2", &w2v, &h, false, false);
    g.output("h", &h);
    g.output("y", &y);
    let forward = g.compile(device)?;

    let mut g = Gen::new();
    let dy = g.input("dy", OUT);
    // The ReLU's derivative comes in as a 0/1 mask: MIL has no comparison op, and a
    // mask made from `h` on the CPU is exact.
    let mask = g.input("mask", HID);
    let w2v = g.weight("w2", OUT, HID, w2(p));
    let dh = g.b.matmul("dh", &w2v, &dy, true, false);
    let dz = g.b.mul("dz2", &dh, &mask);
    g.output("dz", &dz);
    let backward = g.compile(device)?;
    Ok(Kernels { forward, backward, seconds: start.elapsed().as_secs_f64() })
}

/// Surfaces and buffers of one step.
struct Work {
    x: Surface,
    dy: Surface,
    mask: Surface,
    h: Surface,
    y: Surface,
    dz: Surface,
    targets: Vec<f32>,
    grads: Vec<f32>,
    rng: ChaCha8Rng,
}

/// FLOPs of one step: the forward (two matmuls), the backward (one matmul on the
/// device) and the two weight gradients on the CPU; multiply-add = 2.
const DEVICE_FLOPS: f64 = 2.0 * BATCH as f64 * (HID * IN + OUT * HID + OUT * HID) as f64;
const CPU_FLOPS: f64 = 2.0 * BATCH as f64 * (OUT * HID + HID * IN) as f64;

/// One step on a fresh batch: the loss and gradient (into `w.grads`) of the weights
/// the kernels `k` bake.
fn train_step(k: &mut Kernels, teacher: &[f32], w: &mut Work, c: &mut Cumulative) -> device::Result<f32> {
    let xs: Vec<f32> = (0..IN * BATCH).map(|_| w.rng.gen_range(-1.0f32..1.0)).collect();
    // The teacher's answers, on the CPU: t = T2 · relu(T1 · x).
    let mut th = vec![0.0f32; HID * BATCH];
    matmul_acc(MatMut::new(&mut th, HID, BATCH), MatRef::new(w1(teacher), HID, IN), MatRef::new(&xs, IN, BATCH));
    th.iter_mut().for_each(|v| *v = v.max(0.0));
    w.targets.fill(0.0);
    matmul_acc(
        MatMut::new(&mut w.targets, OUT, BATCH),
        MatRef::new(w2(teacher), OUT, HID),
        MatRef::new(&th, HID, BATCH),
    );

    let t0 = Instant::now();
    w.x.write_f32(&xs);
    k.forward.eval(&[&w.x], &mut [&mut w.h, &mut w.y])?;
    let (h, y) = (w.h.to_f32(), w.y.to_f32());
    // MSE over all OUT × BATCH outputs, and its gradient at y.
    let n = (OUT * BATCH) as f32;
    let mut loss = 0.0f64;
    let dy: Vec<f32> = y
        .iter()
        .zip(&w.targets)
        .map(|(y, t)| {
            loss += f64::from((y - t) * (y - t));
            2.0 * (y - t) / n
        })
        .collect();
    let mask: Vec<f32> = h.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.0 }).collect();
    w.dy.write_f32(&dy);
    w.mask.write_f32(&mask);
    k.backward.eval(&[&w.dy, &w.mask], &mut [&mut w.dz])?;
    let dz = w.dz.to_f32();
    let device_time = t0.elapsed().as_secs_f64();
    // dW1 [HID, IN] = dz · xᵀ ; dW2 [OUT, HID] = dy · hᵀ
    w.grads.fill(0.0);
    let (g1, g2) = w.grads.split_at_mut(HID * IN);
    matmul_acc(MatMut::new(g1, HID, IN), MatRef::new(&dz, HID, BATCH), MatRef::new(&xs, IN, BATCH).t());
    matmul_acc(MatMut::new(g2, OUT, HID), MatRef::new(&dy, OUT, BATCH), MatRef::new(&h, HID, BATCH).t());
    c.device_seconds += device_time;
    c.device_flops += DEVICE_FLOPS;
    c.total_flops += DEVICE_FLOPS + CPU_FLOPS;
    Ok((loss / f64::from(n)) as f32)
}

/// Trains from `init` for [`STEPS`] steps, recompiling after every step in the
/// background (`pipelined`) or on the critical path. Returns the losses and totals.
fn run(device: &dyn Device, init: &[f32], teacher: &[f32], pipelined: bool) -> device::Result<(Vec<f32>, Cumulative)> {
    let wall = Instant::now();
    let mut c = Cumulative::default();
    let mut params = init.to_vec();
    // What the kernels in service bake: one step old when pipelined.
    let mut snapshot = init.to_vec();
    let mut kernels = compile(device, &params)?;
    c.compile_seconds += kernels.seconds;
    c.compiles += 2;
    let n = params.len();
    // No weight decay, so no index range needs it.
    let config = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
    let mut adam = AdamW::new(config, n, Vec::new()).expect("no decayed ranges to check");
    let mut w = Work {
        x: Surface::zeros(DType::Fp32, &[1, IN, 1, BATCH]),
        dy: Surface::zeros(DType::Fp32, &[1, OUT, 1, BATCH]),
        mask: Surface::zeros(DType::Fp32, &[1, HID, 1, BATCH]),
        h: Surface::zeros(DType::Fp32, &[1, HID, 1, BATCH]),
        y: Surface::zeros(DType::Fp32, &[1, OUT, 1, BATCH]),
        dz: Surface::zeros(DType::Fp32, &[1, HID, 1, BATCH]),
        targets: vec![0.0; OUT * BATCH],
        grads: vec![0.0; n],
        rng: ChaCha8Rng::seed_from_u64(7),
    };
    let mut background = 0.0;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let start = Instant::now();
        let (loss, waited) = if !pipelined || step == 0 {
            // Static: the kernels must bake the current weights before the step.
            let mut waited = 0.0;
            if step > 0 {
                kernels = compile(device, &params)?;
                waited = kernels.seconds;
                c.compiles += 2;
            }
            (train_step(&mut kernels, teacher, &mut w, &mut c)?, waited)
        } else {
            // Double-buffered: compile for the current weights in the background while
            // the kernels of the previous ones train; swap at the boundary.
            let (loss, next, waited) = std::thread::scope(|s| {
                let job = s.spawn(|| compile(device, &params));
                let loss = train_step(&mut kernels, teacher, &mut w, &mut c);
                let wait = Instant::now();
                let next = job.join().expect("the compile thread does not panic");
                (loss, next, wait.elapsed().as_secs_f64())
            });
            let next = next?;
            background += next.seconds;
            kernels = next;
            c.compiles += 2;
            c.compile_stall_seconds += waited;
            snapshot.copy_from_slice(&params);
            (loss?, waited)
        };
        adam.update(&mut params, &w.grads, LR, 1.0);
        let secs = start.elapsed().as_secs_f64();
        c.compile_seconds += waited;
        c.train_seconds += secs - waited;
        c.steps += 1;
        c.tokens += BATCH as u64;
        losses.push(loss);
    }
    c.wall_seconds = wall.elapsed().as_secs_f64();
    if pipelined {
        println!("  (background compiles: {background:.2} s, overlapped with training)");
    }
    Ok((losses, c))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = CpuDevice::new(Precision::Fp32).with_sim_compile_ms(SIM_COMPILE_MS);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // He-style init: the teacher and the student start from different random weights.
    let init_weights = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        let a = (6.0 / IN as f32).sqrt();
        let b = (6.0 / HID as f32).sqrt();
        let mut v: Vec<f32> = (0..HID * IN).map(|_| rng.gen_range(-a..a)).collect();
        v.extend((0..OUT * HID).map(|_| rng.gen_range(-b..b)));
        v
    };
    let teacher = init_weights(&mut rng);
    let student = init_weights(&mut rng);
    println!(
        "tiny_train: y = W2·relu(W1·x), {IN} → {HID} → {OUT}, {BATCH} examples per step, {STEPS} steps, \
         CPU device with {SIM_COMPILE_MS} ms per compile"
    );
    for pipelined in [false, true] {
        println!(
            "\n{}",
            if pipelined {
                "pipelined: the next kernels compile in the background (one step stale)"
            } else {
                "static: recompile both kernels after every step"
            }
        );
        let (losses, c) = run(&device, &student, &teacher, pipelined)?;
        let shown: Vec<String> = losses.iter().step_by(8).map(|l| format!("{l:.4}")).collect();
        println!("  loss every 8 steps: {} … {:.4}", shown.join("  "), losses.last().copied().unwrap_or(f32::NAN));
        println!("{}", Report::from_cumulative(&c));
    }
    Ok(())
}
