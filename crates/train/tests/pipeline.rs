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

/// A mask over `targets`: every third target and a run at the start of each row are
/// [`IGNORE_TARGET`], as chat data masks the prompt.
fn mask_targets(targets: &[u32], s: usize) -> Vec<u32> {
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 3 == 0 || i % s < 2 { train::data::IGNORE_TARGET } else { t })
        .collect()
}

/// The reference loss with the mask applied by hand: the mean of `−log p[target]` over
/// the targets that are not ignored.
fn reference_masked_loss(params: &Params, inputs: &[u32], targets: &[u32], s: usize) -> f64 {
    let mut total = 0.0f64;
    let mut n = 0;
    for (inp, tgt) in inputs.chunks(s).zip(targets.chunks(s)) {
        let logits = llama::reference::forward_sequence(params, inp).unwrap();
        for (row, &target) in logits.iter().zip(tgt) {
            if target == train::data::IGNORE_TARGET {
                continue;
            }
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            total += lse - row[target as usize] as f64;
            n += 1;
        }
    }
    total / n as f64
}

#[test]
fn masked_loss_and_gradients_match_the_reference_with_the_mask_applied_by_hand() {
    for (name, config) in architectures().into_iter().filter(|(n, _)| ["llama2", "qwen3"].contains(n)) {
        let mut p = params(&config, 13);
        let (b, s) = (2, 8);
        let (inputs, targets) = batch(&config, b, s, 6);
        let masked = mask_targets(&targets, s);
        assert!(masked.contains(&train::data::IGNORE_TARGET) && masked.iter().any(|&t| t < 100));
        let device = CpuDevice::new(Precision::Fp32);
        let mut pipe = DynamicPipeline::new(&device, &config, b, s).unwrap();
        let want = reference_masked_loss(&p, &inputs, &masked, s);
        let loss = pipe.loss(&p, &inputs, &masked).unwrap() as f64;
        assert!((loss - want).abs() < 1e-4 * want.abs().max(1.0), "{name}: pipeline {loss}, reference {want}");
        // It is not the unmasked loss.
        assert!((want - reference_loss(&p, &inputs, &targets, s)).abs() > 1e-3);

        let mut grads = Params::zeros(&config).unwrap();
        let fb_loss = pipe.forward_backward(&p, &mut grads, &inputs, &masked, 1.0).unwrap() as f64;
        assert!((fb_loss - want).abs() < 1e-4 * want.abs().max(1.0), "{name}: forward_backward {fb_loss}");
        let mut rng = ChaCha8Rng::seed_from_u64(98);
        let specs: Vec<_> = p.layout().specs().to_vec();
        for spec in &specs {
            for _ in 0..2 {
                let i = spec.offset + rng.gen_range(0..spec.len());
                let h = 1e-2f32;
                let orig = p.as_slice()[i];
                p.as_mut_slice()[i] = orig + h;
                let up = reference_masked_loss(&p, &inputs, &masked, s);
                p.as_mut_slice()[i] = orig - h;
                let down = reference_masked_loss(&p, &inputs, &masked, s);
                p.as_mut_slice()[i] = orig;
                let fd = (up - down) / (2.0 * h as f64);
                let g = grads.as_slice()[i] as f64;
                assert!(
                    (g - fd).abs() <= 2e-3 + 0.03 * fd.abs(),
                    "{name}: d masked loss / d {}[{}]: pipeline {g}, finite difference {fd}",
                    spec.name,
                    i - spec.offset
                );
            }
        }
    }
}

#[test]
fn a_masked_position_contributes_no_gradient() {
    // Masking a target is the same as removing its row from the loss: the gradient of
    // the masked batch is (N_all · g_all − Σ_masked g_t) / N_kept, computed here from
    // single-target batches (each a batch with all targets but one masked).
    let config = tiny(2);
    let p = params(&config, 17);
    let (b, s) = (1, 8);
    let (inputs, targets) = batch(&config, b, s, 8);
    let ignore = train::data::IGNORE_TARGET;
    let device = CpuDevice::new(Precision::Fp32);
    let mut pipe = DynamicPipeline::new(&device, &config, b, s).unwrap();
    let keep = [1usize, 4, 6];
    let mut masked = vec![ignore; s];
    for &k in &keep {
        masked[k] = targets[k];
    }
    let mut want = vec![0.0f64; p.len()];
    for &k in &keep {
        let mut one = vec![ignore; s];
        one[k] = targets[k];
        let mut g = Params::zeros(&config).unwrap();
        pipe.forward_backward(&p, &mut g, &inputs, &one, 1.0).unwrap();
        for (w, &x) in want.iter_mut().zip(g.as_slice()) {
            *w += f64::from(x) / keep.len() as f64;
        }
    }
    let mut got = Params::zeros(&config).unwrap();
    pipe.forward_backward(&p, &mut got, &inputs, &masked, 1.0).unwrap();
    let max = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    for (i, (&g, &w)) in got.as_slice().iter().zip(&want).enumerate() {
        assert!((f64::from(g) - w).abs() <= 1e-5 * max, "gradient {i}: {g} vs {w}");
    }
    // All targets masked: loss 0 and no gradient at all.
    let mut none = Params::zeros(&config).unwrap();
    let loss = pipe.forward_backward(&p, &mut none, &inputs, &[ignore; 8], 1.0).unwrap();
    assert_eq!(loss, 0.0);
    assert!(none.as_slice().iter().all(|&g| g == 0.0));
}
