//! What fusing attention's `softmax(q·kᵀ + causal mask)` saves in a training step: times
//! `DynamicPipeline::forward_backward` on a CPU device that fuses (the default) and one
//! that runs every op as its own step, alternating the two so both see the same load.
//! The losses and gradient norms of both are printed too: they must agree.
//!
//! `cargo run --release -p train --example attention_fusion [MODEL] [ROUNDS] [BATCH]`

use std::time::Instant;

use device::{cpu::CpuDevice, Precision};
use llama::{Config, Params};
use train::pipeline::DynamicPipeline;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("stories15m", String::as_str);
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(4);
    let batch: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(8);
    let config = Config::preset(preset).expect("a preset name");
    let seq = 256.min(config.seq_len);
    let params = Params::init(&config, 0).unwrap();
    let n = batch * seq;
    let inputs: Vec<u32> = (0..n as u32).map(|i| 3 + i * 7919 % (config.vocab_size as u32 - 3)).collect();
    let targets: Vec<u32> = inputs.iter().map(|t| (t * 31) % config.vocab_size as u32).collect();
    let mut runs: Vec<(&str, DynamicPipeline, Params, Vec<f64>, f32)> = [("unfused", false), ("fused", true)]
        .into_iter()
        .map(|(name, fuse)| {
            let device = CpuDevice::new(Precision::Fp32).with_fusion(fuse);
            let pipe = DynamicPipeline::new(&device, &config, batch, seq).unwrap();
            (name, pipe, Params::zeros(&config).unwrap(), Vec::new(), 0.0)
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
    println!("{preset}, batch {batch} × {seq}, {} threads, {rounds} rounds", rayon::current_num_threads());
    for (name, _, grads, ms, loss) in runs.iter_mut() {
        ms.sort_by(f64::total_cmp);
        let norm = grads.as_slice().iter().map(|g| f64::from(*g).powi(2)).sum::<f64>().sqrt();
        println!("  {name:<8} {:>8.1} ms/step (median)   loss {loss:.6}   |grad| {norm:.6e}", ms[ms.len() / 2]);
    }
    println!("  fused / unfused  {:.3}", runs[1].3[runs[1].3.len() / 2] / runs[0].3[runs[0].3.len() / 2]);
}
