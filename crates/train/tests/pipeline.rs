//! The dynamic pipeline against independent references: its loss against llama's plain
//! reference forward pass, its gradients against finite differences of that loss.

use device::{cpu::CpuDevice, Precision};
use llama::{Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::pipeline::DynamicPipeline;

fn tiny(n_kv_heads: usize) -> Config {
    Config {
        dim: 32,
        hidden_dim: 48,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads,
        vocab_size: 37,
        seq_len: 8,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        qkv_bias: false,
        shared_classifier: n_kv_heads == 4,
        explicit_head_dim: None,
        qk_norm: false,
        rope_scaling: None,
    }
}

/// The architectures the pipeline trains, at a tiny shape: Llama 2 with and without
/// GQA, Qwen2 (QKV biases), Qwen3 (QK-norm, heads 12 wide so q_dim 48 ≠ dim 32), and
/// Llama 3 (llama3 RoPE scaling, whose three frequency regimes all occur at head_dim 8
/// with an original context of 16).
fn architectures() -> Vec<(&'static str, Config)> {
    let scaling = llama::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    };
    vec![
        ("llama2", tiny(4)),
        ("llama2-gqa", tiny(2)),
        ("qwen2", Config { qkv_bias: true, rope_theta: 1e6, ..tiny(2) }),
        ("qwen3", Config { qk_norm: true, explicit_head_dim: Some(12), norm_eps: 1e-6, ..tiny(2) }),
        ("llama3", Config { rope_scaling: Some(scaling), rope_theta: 5e5, ..tiny(2) }),
    ]
}

/// Parameters with larger values than the llama2.c init, so gradients are large
/// enough for finite differences in f32 to resolve.
fn params(config: &Config, seed: u64) -> Params {
    let mut p = Params::init(config, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for v in p.as_mut_slice() {
        *v = rng.gen_range(-0.4f32..0.4);
    }
    for (spec, values) in p.tensors_mut() {
        if spec.name.contains("rms") {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
    }
    p
}

fn batch(config: &Config, b: usize, s: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let stream: Vec<Vec<u32>> =
        (0..b).map(|_| (0..=s).map(|_| rng.gen_range(0..config.vocab_size as u32)).collect()).collect();
    let inputs = stream.iter().flat_map(|row| row[..s].to_vec()).collect();
    let targets = stream.iter().flat_map(|row| row[1..].to_vec()).collect();
    (inputs, targets)
}

/// Mean cross-entropy over the batch with llama's reference forward pass, in f64.
fn reference_loss(params: &Params, inputs: &[u32], targets: &[u32], s: usize) -> f64 {
    let mut total = 0.0f64;
    for (inp, tgt) in inputs.chunks(s).zip(targets.chunks(s)) {
        let logits = llama::reference::forward_sequence(params, inp).unwrap();
        for (row, &target) in logits.iter().zip(tgt) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            total += lse - row[target as usize] as f64;
        }
    }
    total / inputs.len() as f64
}

#[test]
fn loss_matches_the_reference_forward_for_every_architecture() {
    for (n_kv, config) in architectures() {
        let p = params(&config, 7);
        let (b, s) = (2, 8);
        let (inputs, targets) = batch(&config, b, s, 3);
        let device = CpuDevice::new(Precision::Fp32);
        let mut pipe = DynamicPipeline::new(&device, &config, b, s).unwrap();
        let loss = pipe.loss(&p, &inputs, &targets).unwrap() as f64;
        let want = reference_loss(&p, &inputs, &targets, s);
        // Both compute in f32 with different summation orders: a loss of ~4 agrees to
        // a few ulp per op over ~10 ops deep, far below 1e-4.
        assert!((loss - want).abs() < 1e-4 * want.abs().max(1.0), "{n_kv}: pipeline {loss}, reference {want}");
    }
}

#[test]
fn gradients_match_finite_differences_for_every_architecture() {
    for (n_kv, config) in architectures() {
        let mut p = params(&config, 11);
        let (b, s) = (2, 8);
        let (inputs, targets) = batch(&config, b, s, 5);
        let device = CpuDevice::new(Precision::Fp32);
        let mut pipe = DynamicPipeline::new(&device, &config, b, s).unwrap();
        let mut grads = Params::zeros(&config).unwrap();
        pipe.forward_backward(&p, &mut grads, &inputs, &targets, 1.0).unwrap();

        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let specs: Vec<_> = p.layout().specs().to_vec();
        let mut checked = 0;
        for spec in &specs {
            for _ in 0..3 {
                let i = spec.offset + rng.gen_range(0..spec.len());
                let h = 1e-2f32;
                let orig = p.as_slice()[i];
                p.as_mut_slice()[i] = orig + h;
                let up = reference_loss(&p, &inputs, &targets, s);
                p.as_mut_slice()[i] = orig - h;
                let down = reference_loss(&p, &inputs, &targets, s);
                p.as_mut_slice()[i] = orig;
                let fd = (up - down) / (2.0 * h as f64);
                let g = grads.as_slice()[i] as f64;
                // Central differences have O(h²) truncation error and ~1e-7/h of f32
                // noise: 2e-3 absolute plus 3 % relative covers both with margin, while a
                // wrong gradient (a missing term, a transpose) is off by far more.
                assert!(
                    (g - fd).abs() <= 2e-3 + 0.03 * fd.abs(),
                    "{n_kv}: d loss / d {}[{}]: pipeline {g}, finite difference {fd}",
                    spec.name,
                    i - spec.offset
                );
                checked += 1;
            }
        }
        assert!(checked >= 3 * specs.len());
    }
}

#[test]
fn overlapping_dw_with_device_work_changes_nothing() {
    let config = tiny(2);
    let p = params(&config, 21);
    let (b, s) = (2, 8);
    let (inputs, targets) = batch(&config, b, s, 9);
    let device = CpuDevice::new(Precision::Fp32);
    let mut grads = Vec::new();
    for overlap in [false, true] {
        let mut pipe = DynamicPipeline::new(&device, &config, b, s).unwrap();
        pipe.overlap_dw = overlap;
        let mut g = Params::zeros(&config).unwrap();
        pipe.forward_backward(&p, &mut g, &inputs, &targets, 1.0).unwrap();
        grads.push(g.into_vec());
    }
    // The same GEMMs on the same operands, only scheduled differently.
    for (i, (x, y)) in grads[0].iter().zip(&grads[1]).enumerate() {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "gradient {i}: {x} vs {y}");
    }
}
