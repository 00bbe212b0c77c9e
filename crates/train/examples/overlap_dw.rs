//! Does overlapping the weight-gradient GEMMs with device kernels pay on this machine?
//! Times `DynamicPipeline::forward_backward` on a Stories15M-shaped model (batch 8 × 256)
//! with and without `overlap_dw`, alternating the two so both see the same load.
//!
//! `cargo run --release -p train --example overlap_dw [MODEL] [ROUNDS]`

use std::time::Instant;

use device::{cpu::CpuDevice, Precision};
use llama::{Config, Params};
use train::pipeline::DynamicPipeline;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("stories15m", String::as_str);
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(4);
    let config = Config::preset(preset).expect("a preset name");
    let (batch, seq) = (8, 256.min(config.seq_len));
    let params = Params::init(&config, 0).unwrap();
    let mut grads = Params::zeros(&config).unwrap();
    let device = CpuDevice::new(Precision::Fp32);
    let mut pipe = DynamicPipeline::new(&device, &config, batch, seq).unwrap();
    let n = batch * seq;
    let inputs: Vec<u32> = (0..n as u32).map(|i| 3 + i * 7919 % (config.vocab_size as u32 - 3)).collect();
    let targets: Vec<u32> = inputs.iter().map(|t| (t * 31) % config.vocab_size as u32).collect();
    pipe.forward_backward(&params, &mut grads, &inputs, &targets, 1.0).unwrap();
    let mut ms = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, overlap) in [false, true].into_iter().enumerate() {
            pipe.overlap_dw = overlap;
            let t = Instant::now();
            pipe.forward_backward(&params, &mut grads, &inputs, &targets, 1.0).unwrap();
            ms[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut ms[0]), median(&mut ms[1]));
    println!("{preset}, batch {batch} × {seq}, {} threads, {rounds} rounds", rayon::current_num_threads());
    println!("  forward+backward, dW after each kernel   {off:>8.1} ms (median)");
    println!("  forward+backward, dW overlapped          {on:>8.1} ms (median)");
    println!("  overlapped / sequential                  {:>8.3}", on / off);
}
