//! Where a LoRA step's device time goes: each LoRA kernel of one layer (base baked,
//! adapters in the surface) and each dynamic-pipeline kernel (weights in the surface)
//! timed alone on the CPU device at the same shape, median of `REPS` evaluations, the
//! kernels evaluated in turn so that all see the same load.
//!
//! `cargo run --release -p train --example lora_kernels [MODEL] [BATCH] [RANK] [REPS]`

use std::time::Instant;

use device::{cpu::CpuDevice, Device, Precision, Surface};
use llama::{Config, Params};
use train::kernels::{self, KernelDef, LayerDims};
use train::lora::LoraConfig;
use train::lora_kernels as lk;
use train::static_kernels::{self as sk, AttentionWeights, FfnWeights};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("stories110m", String::as_str);
    let batch: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(1);
    let rank: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(8);
    let reps: usize = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(10);
    let config = Config::preset(preset).expect("a preset name");
    let seq = 256.min(config.seq_len);
    let (t, dialect) = (batch * seq, mil::Dialect::Ios18);
    let d = LayerDims::of(&config);
    let params = Params::init(&config, 0).unwrap();
    let w = params.layer(0);
    let aw = AttentionWeights { rms: w.rms_att(), wq: w.wq(), wk: w.wk(), wv: w.wv(), wo: w.wo(), bias: None };
    let fw = FfnWeights { rms: w.rms_ffn(), w1: w.w1(), w2: w.w2(), w3: w.w3() };
    let lora = LoraConfig::new(rank);
    let ad = lk::Adapters::new(&lora.targets, rank);
    let defs: Vec<KernelDef> = vec![
        kernels::qkv_forward(&d, t, dialect).unwrap(),
        kernels::attention_forward(&d, batch, seq, dialect).unwrap(),
        kernels::ffn_forward(&d, t, dialect).unwrap(),
        kernels::ffn_backward(&d, t, dialect).unwrap(),
        kernels::attention_backward(&d, batch, seq, dialect).unwrap(),
        kernels::qkv_backward(&d, t, dialect).unwrap(),
        lk::attention_forward(&d, batch, seq, config.norm_eps, &aw, &ad, dialect).unwrap(),
        lk::ffn_forward(&d, t, config.norm_eps, &fw, &ad, dialect).unwrap(),
        lk::ffn_backward(&d, t, &fw, &ad, dialect).unwrap(),
        lk::attention_backward_wo(&d, t, aw.wo, &ad, dialect).unwrap(),
        sk::attention_backward_free(&d, batch, seq, dialect).unwrap(),
        lk::qkv_backward(&d, t, &aw, &ad, dialect).unwrap(),
        lk::adapter_grads(&d, t, &ad, dialect).unwrap(),
    ];
    println!(
        "{preset}, batch {batch} × {seq}, rank {rank}, {} threads, median of {reps}",
        rayon::current_num_threads()
    );
    let device = CpuDevice::new(Precision::Fp32);
    let dtype = mil::DType::Fp32;
    let mut runs: Vec<_> = defs
        .iter()
        .map(|def| {
            let kernel = device.compile(&def.program, &def.weights).unwrap();
            let inputs: Vec<Surface> = def
                .io
                .inputs
                .iter()
                .map(|l| {
                    let v: Vec<f32> =
                        (0..l.channels * l.width).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.05).collect();
                    Surface::from_f32(dtype, &[1, l.channels, 1, l.width], &v)
                })
                .collect();
            let outputs: Vec<Surface> =
                def.io.output_surfaces.iter().map(|o| Surface::activation(dtype, o.channels, o.width)).collect();
            (def.name, kernel, inputs, outputs, Vec::new())
        })
        .collect();
    for rep in 0..=reps {
        for (_, kernel, inputs, outputs, ms) in runs.iter_mut() {
            let inputs: Vec<&Surface> = inputs.iter().collect();
            let mut outs: Vec<&mut Surface> = outputs.iter_mut().collect();
            let start = Instant::now();
            kernel.eval(&inputs, &mut outs).unwrap();
            if rep > 0 {
                ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for (name, _, _, _, ms) in runs.iter_mut() {
        ms.sort_by(f64::total_cmp);
        println!("  {name:<28} {:>8.2} ms", ms[ms.len() / 2]);
    }
}
