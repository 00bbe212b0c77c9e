//! What the CPU device's fusions save (attention's `softmax(q·kᵀ + causal mask)` as one
//! step, attention's heads and chains of elementwise maps run as regions): times
//! `DynamicPipeline::forward_backward` on a CPU device that fuses (the default) and one
//! that runs every op as its own step, alternating the two so both see the same load,
//! with both runs' losses and gradient norms (they must agree); then each layer kernel
//! alone, fused and unfused in turn.
//!
//! `cargo run --release -p train --example fusion [MODEL] [ROUNDS] [BATCH]`
//! (ROUNDS 0: the kernels only).

use std::time::Instant;

use device::{cpu::CpuDevice, Device, Precision, Surface};
use llama::{Config, Params};
use train::kernels::{
    attention_backward, attention_forward, ffn_backward, ffn_forward, qkv_backward, qkv_forward, KernelDef, LayerDims,
};
use train::pipeline::DynamicPipeline;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("stories15m", String::as_str);
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(4);
    let batch: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(8);
    let config = Config::preset(preset).expect("a preset name");
    let seq = 256.min(config.seq_len);
    println!("{preset}, batch {batch} × {seq}, {} threads, {rounds} rounds", rayon::current_num_threads());
    if rounds > 0 {
        time_steps(&config, batch, seq, rounds);
    }
    let d = LayerDims::new(config.dim, config.hidden_dim, config.n_heads, config.n_kv_heads);
    let dialect = mil::Dialect::Ios18;
    let t = batch * seq;
    let kernels = [
        qkv_forward(&d, t, dialect).unwrap(),
        attention_forward(&d, batch, seq, dialect).unwrap(),
        ffn_forward(&d, t, dialect).unwrap(),
        ffn_backward(&d, t, dialect).unwrap(),
        attention_backward(&d, batch, seq, dialect).unwrap(),
        qkv_backward(&d, t, dialect).unwrap(),
    ];
    for def in &kernels {
        let ms = time_kernel(def, 20);
        println!(
            "  {:<20} unfused {:>7.1} ms   fused {:>7.1} ms   fused / unfused {:.3}",
            def.name,
            ms[0],
            ms[1],
            ms[1] / ms[0]
        );
    }
}

/// Training steps (forward + backward) with and without fusion, alternating.
fn time_steps(config: &Config, batch: usize, seq: usize, rounds: usize) {
    let params = Params::init(config, 0).unwrap();
    let n = batch * seq;
    let inputs: Vec<u32> = (0..n as u32).map(|i| 3 + i * 7919 % (config.vocab_size as u32 - 3)).collect();
    let targets: Vec<u32> = inputs.iter().map(|t| (t * 31) % config.vocab_size as u32).collect();
    let mut runs: Vec<(&str, DynamicPipeline, Params, Vec<f64>, f32)> = [("unfused", false), ("fused", true)]
        .into_iter()
        .map(|(name, fuse)| {
            let device = CpuDevice::new(Precision::Fp32).with_fusion(fuse);
            let pipe = DynamicPipeline::new(&device, config, batch, seq).unwrap();
            (name, pipe, Params::zeros(config).unwrap(), Vec::new(), 0.0)
        })
        .collect();
    for round in 0..=rounds {
        for (_, pipe, grads, ms, loss) in runs.iter_mut() {
            grads.as_mut_slice().fill(0.0);
            let t = Instant::now();
            *loss = pipe.forward_backward(&params, grads, &inputs, &targets, 1.0).unwrap();
            if round > 0 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let mut medians = Vec::new();
    for (name, _, grads, ms, loss) in runs.iter_mut() {
        ms.sort_by(f64::total_cmp);
        medians.push(ms[ms.len() / 2]);
        let norm = grads.as_slice().iter().map(|g| f64::from(*g).powi(2)).sum::<f64>().sqrt();
        println!("  {name:<8} {:>8.1} ms/step (median)   loss {loss:.6}   |grad| {norm:.6e}", ms[ms.len() / 2]);
    }
    println!("  fused / unfused  {:.3}", medians[1] / medians[0]);
}

/// Median ms per eval of `def` on fixed pseudo-random inputs, `[unfused, fused]`, the
/// two kernels evaluated in turn.
fn time_kernel(def: &KernelDef, reps: usize) -> [f64; 2] {
    let mut kernels = [false, true]
        .map(|fuse| CpuDevice::new(Precision::Fp32).with_fusion(fuse).compile(&def.program, &def.weights).unwrap());
    let dtype = mil::DType::Fp32;
    let inputs: Vec<Surface> = def
        .io
        .inputs
        .iter()
        .map(|l| {
            let v: Vec<f32> =
                (0..l.channels * l.width).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.5).collect();
            Surface::from_f32(dtype, &[1, l.channels, 1, l.width], &v)
        })
        .collect();
    let inputs: Vec<&Surface> = inputs.iter().collect();
    let mut outputs: Vec<Surface> =
        def.io.output_surfaces.iter().map(|o| Surface::activation(dtype, o.channels, o.width)).collect();
    let mut ms = [Vec::new(), Vec::new()];
    for rep in 0..=reps {
        for (kernel, ms) in kernels.iter_mut().zip(ms.iter_mut()) {
            let mut outs: Vec<&mut Surface> = outputs.iter_mut().collect();
            let t = Instant::now();
            kernel.eval(&inputs, &mut outs).unwrap();
            if rep > 0 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    ms.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    })
}
