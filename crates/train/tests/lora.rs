//! The LoRA pipeline against independent references: the dynamic pipeline's full
//! gradient of the merged model through the chain rule, finite differences, the merged
//! model's loss, and the device's compile counter.

use device::{cpu::CpuDevice, Device, Precision};
use llama::{Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::binding::IoConvention;
use train::lora::{LoraConfig, LoraParams, LoraTarget};
use train::lora_pipeline::LoraPipeline;
use train::optim::{AdamW, AdamWConfig};
use train::pipeline::DynamicPipeline;

fn tiny(n_kv_heads: usize, qkv_bias: bool) -> Config {
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
        qkv_bias,
        shared_classifier: !qkv_bias,
        explicit_head_dim: None,
        qk_norm: false,
        rope_scaling: None,
    }
}

/// A base of ±0.4 rounded to fp16 numbers (baking it loses nothing).
fn fp16_base(config: &Config, seed: u64) -> Params {
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
    for v in p.as_mut_slice() {
        *v = half::f16::from_f32(*v).to_f32();
    }
    p
}

/// Adapters with a non-zero B too (a fresh B = 0 would leave dA = 0 untested).
fn adapters(config: &Config, lora: &LoraConfig, seed: u64) -> LoraParams {
    let mut p = LoraParams::init(config, lora, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 9);
    for s in p.slots().to_vec() {
        for v in &mut p.as_mut_slice()[s.b] {
            *v = rng.gen_range(-0.3f32..0.3);
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

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zeros");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (largest {scale})");
    }
}

#[test]
fn lora_loss_and_gradients_match_the_merged_model_through_the_chain_rule() {
    // (kv heads, QKV biases, targets): the default q,v; every target with GQA and biases;
    // o without q, k, v and the FFN alone (layer 0 stops early in both).
    let cases = [(4, false, "q,v"), (2, true, "all"), (4, false, "o,down"), (4, false, "up")];
    for (n_kv, bias, targets) in cases {
        let what = format!("kv {n_kv}, bias {bias}, targets {targets}");
        let config = tiny(n_kv, bias);
        let base = fp16_base(&config, 3);
        let lora_cfg =
            LoraConfig { alpha: 12.0, targets: LoraConfig::parse_targets(targets).unwrap(), ..LoraConfig::new(4) };
        let lora = adapters(&config, &lora_cfg, 5);
        let (b, s) = (2, 8);
        let (inputs, targets) = batch(&config, b, s, 4);
        let device = CpuDevice::new(Precision::Fp32);

        // Reference: the dynamic pipeline (itself checked against llama's reference and
        // finite differences) on the merged weights, its full gradient mapped to the
        // adapters by the chain rule (dA = s·Bᵀ·dW, dB = s·dW·Aᵀ).
        let merged = lora.merge(&base);
        let mut dynamic = DynamicPipeline::new(&device, &config, b, s).unwrap();
        let mut full = Params::zeros(&config).unwrap();
        let l_want = dynamic.forward_backward(&merged, &mut full, &inputs, &targets, 1.0).unwrap();
        let g_want = lora.grads_from_full(&full);

        let mut pipe = LoraPipeline::new(&device, base.clone(), &lora_cfg, b, s, IoConvention::Packed).unwrap();
        let mut g_got = vec![0.0f32; lora.len()];
        let l_got = pipe.forward_backward(&lora, &mut g_got, &inputs, &targets, 1.0).unwrap();
        // Merged = unmerged forward, to f32 rounding (different operation order).
        assert!((l_got - l_want).abs() <= 2e-5 * l_want, "{what}: LoRA loss {l_got}, merged {l_want}");
        assert_eq!(pipe.loss(&lora, &inputs, &targets).unwrap(), l_got, "{what}: loss without gradients");
        for s in lora.slots() {
            let name = format!("{what}: layer {} {}", s.layer, s.target.name());
            assert_close(&g_got[s.a.clone()], &g_want[s.a.clone()], 1e-4, &format!("{name} dA"));
            assert_close(&g_got[s.b.clone()], &g_want[s.b.clone()], 1e-4, &format!("{name} dB"));
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let config = tiny(2, false);
    let base = fp16_base(&config, 11);
    let lora_cfg = LoraConfig { targets: LoraTarget::ALL.to_vec(), ..LoraConfig::new(2) };
    let mut lora = adapters(&config, &lora_cfg, 12);
    let (inputs, targets) = batch(&config, 1, 8, 13);
    let device = CpuDevice::new(Precision::Fp32);
    let mut pipe = LoraPipeline::new(&device, base, &lora_cfg, 1, 8, IoConvention::Packed).unwrap();
    let mut grads = vec![0.0f32; lora.len()];
    pipe.forward_backward(&lora, &mut grads, &inputs, &targets, 1.0).unwrap();
    let largest = grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    // Central differences with h = 1e-2: truncation O(h²·L''') ≈ 1e-5, f32 noise of a
    // loss near 3.6 ≈ 4e-7 / h = 4e-5; a wrong term is of the gradient's own size.
    let h = 1e-2f32;
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for s in lora.slots().to_vec() {
        for range in [s.a.clone(), s.b.clone()] {
            for _ in 0..3 {
                let i = rng.gen_range(range.clone());
                let v0 = lora.as_slice()[i];
                lora.as_mut_slice()[i] = v0 + h;
                let up = pipe.loss(&lora, &inputs, &targets).unwrap();
                lora.as_mut_slice()[i] = v0 - h;
                let down = pipe.loss(&lora, &inputs, &targets).unwrap();
                lora.as_mut_slice()[i] = v0;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - grads[i]).abs() <= 2e-3 * largest.max(1e-2),
                    "layer {} {} value {i}: finite difference {fd}, gradient {}",
                    s.layer,
                    s.target.name(),
                    grads[i]
                );
            }
        }
    }
}

#[test]
fn a_lora_step_equals_a_full_step_with_the_base_frozen() {
    // The model whose only trainable parameters are A and B: its gradient is the merged
    // model's full gradient through the chain rule; one AdamW step on it must give the
    // adapters the LoRA pipeline's step gives.
    let config = tiny(4, false);
    let base = fp16_base(&config, 21);
    let lora_cfg = LoraConfig { targets: LoraConfig::parse_targets("q,k,v,o,up").unwrap(), ..LoraConfig::new(4) };
    let start = adapters(&config, &lora_cfg, 22);
    let (inputs, targets) = batch(&config, 2, 8, 23);
    let device = CpuDevice::new(Precision::Fp32);
    let adam_cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let all = std::iter::once(0..start.len()).collect::<Vec<_>>();

    let mut full = Params::zeros(&config).unwrap();
    DynamicPipeline::new(&device, &config, 2, 8)
        .unwrap()
        .forward_backward(&start.merge(&base), &mut full, &inputs, &targets, 1.0)
        .unwrap();
    let mut want = start.clone();
    AdamW::new(adam_cfg, start.len(), all.clone()).unwrap().update(
        want.as_mut_slice(),
        &start.grads_from_full(&full),
        1e-2,
        1.0,
    );

    let mut pipe = LoraPipeline::new(&device, base.clone(), &lora_cfg, 2, 8, IoConvention::Packed).unwrap();
    let mut grads = vec![0.0f32; start.len()];
    pipe.forward_backward(&start, &mut grads, &inputs, &targets, 1.0).unwrap();
    let mut got = start.clone();
    AdamW::new(adam_cfg, start.len(), all).unwrap().update(got.as_mut_slice(), &grads, 1e-2, 1.0);
    // Adam's first step moves each value by ≈ lr·sign(g): the updates agree unless a
    // gradient is wrong (tiny gradients near 0 could flip sign: compare the moves with
    // the lr as scale).
    let moved = |p: &LoraParams| p.as_slice().iter().zip(start.as_slice()).map(|(a, b)| a - b).collect::<Vec<f32>>();
    let (mg, mw) = (moved(&got), moved(&want));
    let agree = mg.iter().zip(&mw).filter(|(a, b)| (*a - *b).abs() <= 1e-4).count();
    assert!(agree as f64 >= 0.999 * mg.len() as f64, "{agree} of {} updates agree", mg.len());
    // The base did not move: the pipeline owns it and gives it no gradient.
    assert_eq!(pipe.base(), &base);
}

#[test]
fn the_run_compiles_each_kernel_once_whatever_the_step_count() {
    let config = tiny(2, false);
    let base = fp16_base(&config, 31);
    for (targets, kernels) in [("q,v", 5 * 2 + 2), ("gate,down", 5 * 2 + 2), ("all", 5 * 2 + 3)] {
        let lora_cfg = LoraConfig { targets: LoraConfig::parse_targets(targets).unwrap(), ..LoraConfig::new(4) };
        let device = CpuDevice::new(Precision::Fp32);
        let mut pipe = LoraPipeline::new(&device, base.clone(), &lora_cfg, 1, 8, IoConvention::Packed).unwrap();
        assert_eq!(pipe.kernels(), kernels, "{targets}");
        assert_eq!(device.compiles_done(), kernels, "{targets}: compiles at construction");
        let mut lora = adapters(&config, &lora_cfg, 32);
        let mut grads = vec![0.0f32; lora.len()];
        for step in 0..3 {
            let (inputs, targets) = batch(&config, 1, 8, 40 + step);
            pipe.forward_backward(&lora, &mut grads, &inputs, &targets, 1.0).unwrap();
            lora.as_mut_slice().iter_mut().zip(&grads).for_each(|(p, g)| *p -= 0.1 * g);
        }
        assert_eq!(device.compiles_done(), kernels, "{targets}: no compile after the first");
    }
}

#[test]
fn fp16_device_keeps_the_lora_loss_close() {
    let config = tiny(2, false);
    let base = fp16_base(&config, 41);
    let lora_cfg = LoraConfig { targets: LoraTarget::ALL.to_vec(), ..LoraConfig::new(4) };
    let lora = adapters(&config, &lora_cfg, 42);
    let (inputs, targets) = batch(&config, 2, 8, 43);
    let want = LoraPipeline::new(&CpuDevice::new(Precision::Fp32), base.clone(), &lora_cfg, 2, 8, IoConvention::Packed)
        .unwrap()
        .loss(&lora, &inputs, &targets)
        .unwrap();
    let device = CpuDevice::new(Precision::Fp16);
    let mut pipe = LoraPipeline::new(&device, base, &lora_cfg, 2, 8, IoConvention::Packed).unwrap();
    let mut grads = vec![0.0f32; lora.len()];
    let got = pipe.forward_backward(&lora, &mut grads, &inputs, &targets, 1.0).unwrap();
    assert!((got - want).abs() < 0.02 * want, "fp16 loss {got}, fp32 {want}");
    assert!(grads.iter().all(|g| g.is_finite()) && grads.iter().any(|&g| g != 0.0));
}

#[test]
fn dropout_gradients_match_finite_differences_with_a_fixed_mask() {
    let config = tiny(2, false);
    let base = fp16_base(&config, 21);
    let lora_cfg = LoraConfig { targets: LoraTarget::ALL.to_vec(), dropout: 0.3, ..LoraConfig::new(2) };
    let mut lora = adapters(&config, &lora_cfg, 22);
    let (inputs, targets) = batch(&config, 2, 8, 23);
    let device = CpuDevice::new(Precision::Fp32);
    let mut pipe = LoraPipeline::new(&device, base, &lora_cfg, 2, 8, IoConvention::Packed).unwrap();
    let eval_loss = pipe.loss(&lora, &inputs, &targets).unwrap();
    // The same seed draws the same masks in every pass: the loss is a fixed function.
    pipe.set_dropout_seed(Some(99));
    let mut grads = vec![0.0f32; lora.len()];
    let loss = pipe.forward_backward(&lora, &mut grads, &inputs, &targets, 1.0).unwrap();
    assert_eq!(pipe.loss(&lora, &inputs, &targets).unwrap(), loss, "the same seed must draw the same masks");
    assert!((loss - eval_loss).abs() > 1e-4, "dropout changed nothing: {loss} vs {eval_loss} without it");
    pipe.set_dropout_seed(Some(100));
    assert_ne!(pipe.loss(&lora, &inputs, &targets).unwrap(), loss, "another seed must draw other masks");
    pipe.set_dropout_seed(Some(99));
    let largest = grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    // As lora_gradients_match_finite_differences, with h = 3e-3: the masks (0 or 1/0.7)
    // steepen the loss (gradients up to ~1), and at h = 1e-2 the O(h²) truncation reached
    // 0.7 % of a gradient; f32 noise ≈ 4e-7 / h ≈ 1.3e-4 stays well inside the tolerance.
    let h = 3e-3f32;
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    for s in lora.slots().to_vec() {
        for range in [s.a.clone(), s.b.clone()] {
            for _ in 0..3 {
                let i = rng.gen_range(range.clone());
                let v0 = lora.as_slice()[i];
                lora.as_mut_slice()[i] = v0 + h;
                let up = pipe.loss(&lora, &inputs, &targets).unwrap();
                lora.as_mut_slice()[i] = v0 - h;
                let down = pipe.loss(&lora, &inputs, &targets).unwrap();
                lora.as_mut_slice()[i] = v0;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - grads[i]).abs() <= 2e-3 * largest.max(1e-2),
                    "layer {} {} value {i}: finite difference {fd}, gradient {}",
                    s.layer,
                    s.target.name(),
                    grads[i]
                );
            }
        }
    }
}

#[test]
fn dropout_zero_and_dropout_without_a_seed_are_bit_identical_to_no_dropout() {
    let config = tiny(4, false);
    let base = fp16_base(&config, 31);
    let plain = LoraConfig { targets: LoraTarget::ALL.to_vec(), ..LoraConfig::new(4) };
    let lora = adapters(&config, &plain, 32);
    let (inputs, targets) = batch(&config, 2, 8, 33);
    let device = CpuDevice::new(Precision::Fp32);
    let run = |cfg: &LoraConfig, seed: Option<u64>| {
        let mut pipe = LoraPipeline::new(&device, base.clone(), cfg, 2, 8, IoConvention::Packed).unwrap();
        pipe.set_dropout_seed(seed);
        let lora = LoraParams::from_vec(&config, cfg, lora.as_slice().to_vec()).unwrap();
        let mut grads = vec![0.0f32; lora.len()];
        let loss = pipe.forward_backward(&lora, &mut grads, &inputs, &targets, 1.0).unwrap();
        (loss.to_bits(), grads.iter().map(|g| g.to_bits()).collect::<Vec<u32>>())
    };
    let reference = run(&plain, None);
    // p = 0 compiles the programs without mask blocks: a seed changes nothing.
    assert_eq!(run(&plain, Some(5)), reference, "p = 0 with a dropout seed");
    // p > 0 without a seed (evaluation) multiplies by masks of ones: exact.
    let dropped = LoraConfig { dropout: 0.4, ..plain.clone() };
    assert_eq!(run(&dropped, None), reference, "p = 0.4 without a seed");
    assert_ne!(run(&dropped, Some(5)), reference, "p = 0.4 with a seed must drop something");
}

#[test]
fn dropout_masks_drop_p_of_the_values_and_scale_the_rest() {
    use train::lora_pipeline::{dropout_seed, fill_dropout_mask};
    let p = 0.25f32;
    let mut mask = vec![0.0f32; 100_000];
    fill_dropout_mask(&mut mask, p, 7, 3, 1);
    let zeros = mask.iter().filter(|&&v| v == 0.0).count() as f64 / mask.len() as f64;
    // Binomial: standard deviation sqrt(p(1−p)/n) ≈ 0.0014; 5σ either way.
    assert!((zeros - 0.25).abs() < 0.007, "{zeros} of the values dropped, expected 0.25");
    assert!(mask.iter().all(|&v| v == 0.0 || v == 1.0 / (1.0 - p)), "kept values must be 1/(1−p)");
    let mut again = vec![0.0f32; mask.len()];
    fill_dropout_mask(&mut again, p, 7, 3, 1);
    assert_eq!(again, mask, "the same seed, layer and target draw the same mask");
    for (seed, layer, target) in [(8, 3, 1), (7, 4, 1), (7, 3, 0)] {
        fill_dropout_mask(&mut again, p, seed, layer, target);
        assert_ne!(again, mask, "seed {seed}, layer {layer}, target {target} must draw another mask");
    }
    let seeds = [dropout_seed(1, 0, 0), dropout_seed(1, 1, 0), dropout_seed(1, 0, 1), dropout_seed(2, 0, 0)];
    for i in 0..seeds.len() {
        for j in i + 1..seeds.len() {
            assert_ne!(seeds[i], seeds[j], "step, micro-batch and run seed must each change the seed");
        }
    }
}
