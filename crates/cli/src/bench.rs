//! `anetrain bench …`: benchmarks that print figures and ratios measured in the same run.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use device::Precision;
use rayon::prelude::*;
use train::model::Decoder;

use crate::devices::{open_device, DeviceArg};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// CPU device matmul and 1×1 conv at transformer shapes against the best GEMM this
    /// machine runs (the GEMM crate called directly), and per-op dispatch overhead.
    Gemm,
    /// Prefill and decode speed of a random model, against the memory-bandwidth roofline.
    Sample {
        /// A preset (stories15m, stories110m, …) with random weights, or a model.bin.
        #[arg(long, default_value = "stories110m")]
        model: String,
        /// Prompt tokens to prefill.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens to decode after the prompt.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceArg,
        #[arg(long, default_value = "fp32")]
        precision: Precision,
    },
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Gemm => {
            let rows = device::cpu::bench::bench_gemm(&device::cpu::bench::GemmBenchConfig::default());
            print!("{}", device::cpu::bench::format_gemm_table(&rows));
            Ok(())
        }
        BenchCommand::Sample { model, prompt, decode, device, precision } => {
            bench_sample(&model, prompt, decode, device, precision)
        }
    }
}

/// A preset name with random weights (seed 0), or a model file.
pub fn model_or_preset(spec: &str) -> Result<llama::Params> {
    match llama::Config::preset(spec) {
        Some(config) => Ok(llama::Params::init(&config, 0)?),
        None if std::path::Path::new(spec).exists() => crate::load_model(std::path::Path::new(spec)),
        None => bail!("`{spec}` is neither a preset ({}) nor a file", llama::config::PRESETS.join(", ")),
    }
}

/// Read bandwidth of this machine in GB/s: all threads summing a buffer far larger than
/// the caches, best of a few runs.
pub fn read_bandwidth_gbs() -> f64 {
    const BYTES: usize = 512 << 20;
    let data = vec![1.0f32; BYTES / 4];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: f32 = data.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(BYTES as f64 / secs / 1e9);
    }
    best
}

fn bench_sample(spec: &str, prompt: usize, decode: usize, which: DeviceArg, precision: Precision) -> Result<()> {
    let params = model_or_preset(spec)?;
    let config = params.config().clone();
    if prompt == 0 || prompt + decode > config.seq_len {
        bail!("--prompt {prompt} plus --decode {decode} must be between 1 and the context of {}", config.seq_len);
    }
    let device = open_device(which, precision)?;
    let mut decoder = Decoder::new(device.as_ref(), &params)?;
    let tokens: Vec<u32> = (0..prompt as u32).map(|i| 3 + (i * 7919) % (config.vocab_size as u32 - 3)).collect();
    // Warm-up: compiles the kernels and packs the weights once.
    decoder.forward(&tokens)?;
    decoder.forward(&tokens[..1])?;
    decoder.reset();

    let start = Instant::now();
    let mut logits = decoder.forward(&tokens)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..decode {
        let next = llama::sampler::argmax(&logits) as u32;
        logits = decoder.forward(&[next])?;
    }
    let decode_s = start.elapsed().as_secs_f64();

    let bandwidth = read_bandwidth_gbs();
    // Decoding one token reads every weight once: the packed layer surfaces and the
    // classifier, in the surfaces' dtype (embedding rows read per token are negligible).
    let io_bytes = match device.dialect() {
        mil::Dialect::Ios18 => 4,
        mil::Dialect::Ios16 => 2,
    };
    let n_params = config.n_params();
    let embedding = config.vocab_size * config.dim;
    let bytes_per_token = (n_params - if config.shared_classifier { 0 } else { embedding }) * io_bytes;
    let roofline = bandwidth * 1e9 / bytes_per_token as f64;
    let decode_rate = decode as f64 / decode_s;
    println!("bench sample: {spec} ({:.1} M params) on {} ({})", n_params as f64 / 1e6, device.name(), precision.name());
    println!("  prefill   {prompt:>5} tokens  {:>9.1} tokens/s", prompt as f64 / prefill_s);
    println!("  decode    {decode:>5} tokens  {:>9.1} tokens/s", decode_rate);
    println!("  memory read bandwidth        {bandwidth:>9.1} GB/s (measured now)");
    println!("  weight bytes per token       {:>9.1} MB", bytes_per_token as f64 / 1e6);
    println!("  decode roofline              {roofline:>9.1} tokens/s");
    println!("  decode / roofline            {:>9.1} %", 100.0 * decode_rate / roofline);
    Ok(())
}
