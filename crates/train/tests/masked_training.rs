//! Training on masked (chat) data: the trainer's loss is the mean over the step's loss
//! tokens however the step is split into micro-batches, a mask of all ones changes
//! nothing bit for bit, and every pipeline that trains takes masked data.

use device::cpu::CpuDevice;
use device::Precision;
use llama::{Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::data::Dataset;
use train::pipelines::{PipelineConfig, PipelineKind};
use train::telemetry::{Event, Telemetry};
use train::trainer::{TrainConfig, Trainer};

fn tiny() -> Config {
    Config {
        dim: 32,
        hidden_dim: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        vocab_size: 48,
        seq_len: 16,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        qkv_bias: false,
        shared_classifier: false,
        explicit_head_dim: None,
        qk_norm: false,
        rope_scaling: None,
    }
}

/// Tokens with a pattern, and a mask of "prompt" (0) and "reply" (1) stretches.
fn tokens_and_mask(vocab: usize) -> (Vec<u32>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let tokens =
        (0..3000u32).map(|i| if rng.gen_bool(0.8) { i % 13 + 3 } else { rng.gen_range(0..vocab as u32) }).collect();
    let mask = (0..3000).map(|i| u8::from(i % 10 >= 6)).collect();
    (tokens, mask)
}

fn settings(batch: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        steps: 4,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 0,
        batch,
        accum,
        seq: 12,
        clip: 1.0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        eval_every: 0,
        eval_batches: 2,
        ckpt_every: 0,
        seed: 9,
        loss_scaling: false,
    }
}

/// Runs `steps` steps; returns the losses, the final parameters and the telemetry lines.
fn run(pipeline: PipelineConfig, data: Dataset, t: TrainConfig) -> (Vec<f32>, Vec<f32>, Vec<Event>) {
    let config = tiny();
    let device = CpuDevice::new(Precision::Fp32);
    let params = Params::init(&config, 1).unwrap();
    let mut trainer = Trainer::with_pipeline(&device, params, t.clone(), pipeline, data, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("telemetry.jsonl");
    let mut telemetry = Telemetry::open(&path).unwrap();
    let losses = (0..t.steps).map(|_| trainer.step(&mut telemetry).unwrap().loss).collect();
    drop(telemetry);
    let events = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (losses, trainer.params.as_slice().to_vec(), events)
}

fn dynamic() -> PipelineConfig {
    PipelineConfig::new(PipelineKind::Dynamic, false)
}

fn data(mask: bool) -> Dataset {
    let config = tiny();
    let (tokens, m) = tokens_and_mask(config.vocab_size);
    Dataset::from_masked_tokens("chat", &tokens, mask.then_some(&m[..]), config.vocab_size, 12).unwrap()
}

#[test]
fn a_mask_of_all_ones_is_bit_identical_to_no_mask() {
    let config = tiny();
    let (tokens, _) = tokens_and_mask(config.vocab_size);
    let ones = vec![1u8; tokens.len()];
    for accum in [1, 3] {
        let plain = Dataset::from_masked_tokens("plain", &tokens, None, config.vocab_size, 12).unwrap();
        let masked = Dataset::from_masked_tokens("ones", &tokens, Some(&ones), config.vocab_size, 12).unwrap();
        assert!(masked.is_masked() && !plain.is_masked());
        let (l0, p0, _) = run(dynamic(), plain, settings(2, accum));
        let (l1, p1, _) = run(dynamic(), masked, settings(2, accum));
        assert_eq!(l0, l1, "accum {accum}: losses");
        assert!(p0.iter().zip(&p1).all(|(a, b)| a.to_bits() == b.to_bits()), "accum {accum}: parameters");
    }
}

#[test]
fn the_step_loss_is_the_mean_over_its_loss_tokens_however_it_is_split() {
    // batch 4 × accum 1 and batch 1 × accum 4 draw the same four windows; with a mask
    // their micro-batches hold different numbers of loss tokens, and the step must
    // still weigh every loss token alike.
    let (one, p_one, events) = run(dynamic(), data(true), settings(4, 1));
    let (four, p_four, _) = run(dynamic(), data(true), settings(1, 4));
    for (k, (a, b)) in one.iter().zip(&four).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {}: {a} vs {b}", k + 1);
    }
    let max_diff = p_one.iter().zip(&p_four).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_diff < 1e-5, "parameters differ by {max_diff}");
    // Telemetry counts the loss tokens: 40 % of the targets are masked out.
    let counts: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step { loss_tokens, .. } => *loss_tokens,
            _ => None,
        })
        .collect();
    assert_eq!(counts.len(), 4);
    assert!(counts.iter().all(|&n| n > 0 && n < 4 * 12), "{counts:?}");
    // An unmasked run reports every target.
    let (_, _, events) = run(dynamic(), data(false), settings(4, 1));
    assert!(events.iter().any(|e| matches!(e, Event::Step { loss_tokens: Some(48), .. })));
}

#[test]
fn every_pipeline_trains_on_masked_data_alike() {
    // The static pipelines bake fp16-rounded weights, so their losses agree with the
    // dynamic pipeline's to about 1e-5 here (see tests/static_pipeline.rs for a bound);
    // a pipeline that ignored the mask would differ by the 0.05–0.14 the mask makes.
    let (reference, _, _) = run(dynamic(), data(true), settings(2, 2));
    let (unmasked, _, _) = run(dynamic(), data(false), settings(2, 2));
    assert!((reference[3] - unmasked[3]).abs() > 0.05, "the mask changes the run: {reference:?} vs {unmasked:?}");
    let static_ = PipelineConfig::new(PipelineKind::Static, false);
    let extras = PipelineConfig::new(PipelineKind::Static, true);
    for (name, pipeline) in [("static", static_), ("static with extras", extras)] {
        let (losses, _, _) = run(pipeline, data(true), settings(2, 2));
        for (k, (l, d)) in losses.iter().zip(&reference).enumerate() {
            assert!((l - d).abs() < 1e-3, "{name}, step {}: {losses:?} vs dynamic {reference:?}", k + 1);
        }
    }
    // The double-buffered pipeline trains on one-step-old weights: its first step only
    // is the dynamic pipeline's.
    let (losses, _, _) = run(PipelineConfig::new(PipelineKind::DoubleBuffer, false), data(true), settings(2, 2));
    assert!((losses[0] - reference[0]).abs() < 1e-3, "double buffer: {losses:?} vs dynamic {reference:?}");
}
