//! The static and double-buffered pipelines against independent references: the
//! dynamic pipeline (itself checked against llama's reference forward and finite
//! differences), a hand-written delayed-gradient loop, and the ANE lint.

use device::{cpu::CpuDevice, Device, Precision};
use llama::{Config, Params};
use mil::Dialect;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::data::{Dataset, Sampler};
use train::kernels::{KernelDef, LayerDims};
use train::optim::{self, AdamW, AdamWConfig, LossScaler, LrSchedule};
use train::pipeline::DynamicPipeline;
use train::pipelines::{PipelineConfig, PipelineKind};
use train::static_kernels as sk;
use train::static_pipeline::{StaticOptions, StaticPipeline};
use train::telemetry::Telemetry;
use train::trainer::{TrainConfig, Trainer};

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

/// Parameters of ±0.4 (norm gains around 1), rounded to fp16 numbers: baking them into
/// a kernel loses nothing, so the static pipeline must match the dynamic one to f32
/// rounding.
fn fp16_params(config: &Config, seed: u64) -> Params {
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

fn batch(config: &Config, b: usize, s: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let stream: Vec<Vec<u32>> =
        (0..b).map(|_| (0..=s).map(|_| rng.gen_range(0..config.vocab_size as u32)).collect()).collect();
    let inputs = stream.iter().flat_map(|row| row[..s].to_vec()).collect();
    let targets = stream.iter().flat_map(|row| row[1..].to_vec()).collect();
    (inputs, targets)
}

#[test]
fn static_matches_dynamic_when_the_weights_are_fp16_numbers() {
    // (kv heads, QKV bias + own classifier, extras, vocabulary chunk): MHA; GQA with
    // biases; the extras in one chunk; the extras in three chunks (37 = 13 + 13 + 11).
    // Last, Llama 3's scaled RoPE (the static kernels' RoPE tables are constants).
    let cases = [
        (4, false, false, 65536, false),
        (2, true, false, 65536, false),
        (2, false, true, 65536, false),
        (4, true, true, 13, false),
        (2, false, false, 65536, true),
    ];
    for (n_kv, bias, extras, chunk, scaled) in cases {
        let what = format!("kv heads {n_kv}, bias {bias}, extras {extras}, vocab chunk {chunk}, scaled RoPE {scaled}");
        let scaling = llama::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        };
        let config = Config { rope_scaling: scaled.then_some(scaling), ..tiny(n_kv, bias) };
        let p = fp16_params(&config, 3);
        let (b, s) = (2, 8);
        let (inputs, targets) = batch(&config, b, s, 4);
        let device = CpuDevice::new(Precision::Fp32);
        let mut dynamic = DynamicPipeline::new(&device, &config, b, s).unwrap();
        let options = StaticOptions { ane_extras: extras, vocab_chunk: chunk, ..StaticOptions::default() };
        let mut stat = StaticPipeline::new(&device, &p, 0, b, s, options).unwrap();
        let mut want = Params::zeros(&config).unwrap();
        let mut got = Params::zeros(&config).unwrap();
        let l_want = dynamic.forward_backward(&p, &mut want, &inputs, &targets, 1.0).unwrap();
        let l_got = stat.forward_backward(&p, &mut got, &inputs, &targets, 1.0).unwrap();
        // Both compute in f32 (fp16 weights are exact in f32); they differ in the order
        // of operations (fused norms, RoPE by slices, pow(−½) for 1/√): a few ulp per op
        // over ~30 ops deep is ~1e-6 relative; 2e-5 leaves margin, a wrong term is O(1).
        assert!((l_got - l_want).abs() <= 2e-5 * l_want, "{what}: loss {l_got} vs dynamic {l_want}");
        assert_eq!(stat.loss(&p, &inputs, &targets).unwrap(), l_got, "{what}: loss without gradients");
        for spec in p.layout().specs() {
            let (w, g) = (&want.as_slice()[spec.range()], &got.as_slice()[spec.range()]);
            let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{what}: d loss / d {}[{i}]: static {b}, dynamic {a} (largest {scale})",
                    spec.name
                );
            }
        }
    }
}

/// The static kernels have no QK-norm and assume heads of dim / n_heads: a Qwen3-shaped
/// model is refused by name rather than trained wrong.
#[test]
fn the_static_pipelines_refuse_qwen3_shaped_models() {
    let config = Config { qk_norm: true, explicit_head_dim: Some(12), ..tiny(2, false) };
    let p = Params::init(&config, 1).unwrap();
    let device = CpuDevice::new(Precision::Fp32);
    for kind in [train::pipelines::PipelineKind::Static, train::pipelines::PipelineKind::DoubleBuffer] {
        let settings = train::pipelines::PipelineConfig::new(kind, false);
        let Err(e) = train::pipelines::Pipeline::new(&device, settings, &p, 0, None, 2, 8) else {
            panic!("{kind:?} accepted a Qwen3-shaped model")
        };
        assert!(e.to_string().contains("--pipeline dynamic only"), "{e}");
    }
}

#[test]
fn fp16_rounding_mode_keeps_the_static_loss_close() {
    // On the fp16-rounding device every op's result is rounded to fp16 (11 bits): the
    // loss of a 2-layer model drifts by a few 1e-3 relative. 2 % catches a broken fp16
    // path (an overflow, a zero softmax, a missing cast) without flaking.
    let config = tiny(2, false);
    let p = fp16_params(&config, 5);
    let (inputs, targets) = batch(&config, 2, 8, 6);
    let want = DynamicPipeline::new(&CpuDevice::new(Precision::Fp32), &config, 2, 8)
        .unwrap()
        .loss(&p, &inputs, &targets)
        .unwrap();
    for extras in [false, true] {
        let device = CpuDevice::new(Precision::Fp16);
        let options = StaticOptions { ane_extras: extras, vocab_chunk: 20, ..StaticOptions::default() };
        let mut stat = StaticPipeline::new(&device, &p, 0, 2, 8, options).unwrap();
        let mut grads = Params::zeros(&config).unwrap();
        let got = stat.forward_backward(&p, &mut grads, &inputs, &targets, 1.0).unwrap();
        assert!((got - want).abs() < 0.02 * want, "extras {extras}: fp16 loss {got}, fp32 {want}");
        assert!(grads.as_slice().iter().all(|g| g.is_finite()), "extras {extras}: non-finite gradient");
    }
}

/// Every program the static pipeline generates, at one layer's shapes: the five
/// weight-bearing kernels, the weight-free ones, and the extras with `chunks`
/// vocabulary chunks of `rows` rows.
fn static_programs(d: &LayerDims, batch: usize, seq: usize, chunks: &[usize], dialect: Dialect) -> Vec<KernelDef> {
    let t = batch * seq;
    let (dim, kv, hid) = (d.dim, d.kv_dim(), d.hidden);
    let zeros = |n: usize| vec![0.01f32; n];
    let (rms, wq, wk, wv, wo) = (zeros(dim), zeros(dim * dim), zeros(kv * dim), zeros(kv * dim), zeros(dim * dim));
    let (bq, bk, bv) = (zeros(dim), zeros(kv), zeros(kv));
    let (w1, w2, w3) = (zeros(hid * dim), zeros(dim * hid), zeros(hid * dim));
    let aw = sk::AttentionWeights { rms: &rms, wq: &wq, wk: &wk, wv: &wv, wo: &wo, bias: Some((&bq, &bk, &bv)) };
    let fw = sk::FfnWeights { rms: &rms, w1: &w1, w2: &w2, w3: &w3 };
    let mut v = vec![
        sk::attention_forward(d, batch, seq, 1e-5, &aw, dialect).unwrap(),
        sk::attention_forward(d, batch, seq, 1e-5, &sk::AttentionWeights { bias: None, ..aw }, dialect).unwrap(),
        sk::ffn_forward(d, t, 1e-5, &fw, dialect).unwrap(),
        sk::ffn_backward(d, t, &fw, dialect).unwrap(),
        sk::attention_backward_wo(d, t, &wo, dialect).unwrap(),
        sk::attention_backward_free(d, batch, seq, dialect).unwrap(),
        sk::qkv_backward(d, t, &aw, dialect).unwrap(),
        sk::rmsnorm(dim, t, 1e-5, &rms, dialect).unwrap(),
        sk::rmsnorm_backward(dim, t, 1e-5, dialect).unwrap(),
    ];
    for &rows in chunks {
        v.push(sk::classifier_softmax(dim, t, rows, &zeros(rows * dim), chunks.len() > 1, dialect).unwrap());
    }
    v
}

#[test]
fn every_static_program_passes_the_ane_lint_and_prints_and_parses_back() {
    // Stories15M and Stories110M layers at training shapes (vocabulary 32000: one
    // chunk), and a Stories260K-shaped GQA layer with a 150 000-token vocabulary, which
    // must split into chunks of at most 65536 rows (here 3 × 50 000).
    let chunked: Vec<usize> = sk::vocab_chunks(150_000, mil::lint::MAX_DIMENSION).iter().map(|r| r.len()).collect();
    assert_eq!(chunked, vec![50_000; 3]);
    let shapes = [
        (LayerDims::new(288, 768, 6, 6), 2, 256, vec![32_000]),
        (LayerDims::new(768, 2048, 12, 12), 1, 256, vec![32_000]),
        (LayerDims::new(64, 172, 8, 4), 2, 128, chunked),
    ];
    for (d, batch, seq, chunks) in &shapes {
        for dialect in [Dialect::Ios18, Dialect::Ios16] {
            for k in static_programs(d, *batch, *seq, chunks, dialect) {
                let errors: Vec<String> = mil::lint::lint(&k.program)
                    .iter()
                    .filter(|f| f.severity == mil::lint::Severity::Error)
                    .map(|f| f.to_string())
                    .collect();
                assert!(errors.is_empty(), "{} ({dialect}, dim {}): {errors:#?}", k.name, d.dim);
                if d.dim == 64 {
                    mil::validate(&k.program).unwrap_or_else(|e| panic!("{}: {e}", k.name));
                    let text = mil::text::print(&k.program);
                    assert_eq!(mil::text::parse(&text).unwrap(), k.program, "{} does not parse back", k.name);
                }
            }
        }
    }
}

/// Tokens with structure to learn (a noisy counting pattern) for trainer tests.
fn dataset(vocab: usize, seq: usize) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let tokens: Vec<u16> = (0..4000u32)
        .map(|i| if rng.gen_bool(0.8) { (i % 11) as u16 + 3 } else { rng.gen_range(0..vocab as u16) })
        .collect();
    Dataset::from_tokens("pattern", tokens, vocab, seq).unwrap()
}

fn settings(steps: u64, batch: usize, seq: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 0,
        batch,
        accum,
        seq,
        clip: 1.0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        eval_every: 0,
        eval_batches: 1,
        ckpt_every: 0,
        seed: 9,
        loss_scaling: false,
    }
}

/// Trains `config` from its seed-1 init on [`dataset`] for all of `t.steps`; returns the
/// step losses and the trainer.
fn run<'d>(
    device: &'d dyn Device,
    config: &Config,
    pipeline: PipelineConfig,
    t: TrainConfig,
) -> (Vec<f32>, Trainer<'d>) {
    let steps = t.steps;
    run_steps(device, config, pipeline, t, steps)
}

/// [`run`], stopping after `steps` steps of the schedule.
fn run_steps<'d>(
    device: &'d dyn Device,
    config: &Config,
    pipeline: PipelineConfig,
    t: TrainConfig,
    steps: u64,
) -> (Vec<f32>, Trainer<'d>) {
    let params = Params::init(config, 1).unwrap();
    let data = dataset(config.vocab_size, t.seq);
    let mut trainer = Trainer::with_pipeline(device, params, t, pipeline, data, None).unwrap();
    let mut telemetry = Telemetry::none();
    let losses = (0..steps).map(|_| trainer.step(&mut telemetry).unwrap().loss).collect();
    (losses, trainer)
}

#[test]
fn static_static_with_extras_and_dynamic_give_the_same_losses_step_by_step() {
    let config = tiny(2, false);
    let device = CpuDevice::new(Precision::Fp32);
    let t = settings(8, 4, 8, 1);
    let (dynamic, _) = run(&device, &config, PipelineConfig::new(PipelineKind::Dynamic, false), t.clone());
    let (stat, _) = run(&device, &config, PipelineConfig::new(PipelineKind::Static, false), t.clone());
    let (extras, _) = run(&device, &config, PipelineConfig::new(PipelineKind::Static, true), t.clone());

    // The tolerance. The three runs differ only in that the static kernels hold the
    // weights rounded to fp16, each moved by at most 2⁻¹¹ of itself (the extras also
    // round the classifier). To first order that moves a loss by at most
    // B = 2⁻¹¹ · Σ |∂L/∂w · w|, computed here at the first step (same parameters, same
    // first batch as the runs). Later steps add the drift of trajectories whose
    // gradients differed by as little: a factor 4 on B covers 8 small steps (the
    // measured differences stay below B), while a wrong kernel moves the loss by O(1).
    let params = Params::init(&config, 1).unwrap();
    let mut sampler = Sampler::new(t.seed);
    let (mut inputs, mut targets) = (vec![0; t.batch * t.seq], vec![0; t.batch * t.seq]);
    dataset(config.vocab_size, t.seq).sample_batch(&mut sampler, &mut inputs, &mut targets);
    let mut grads = Params::zeros(&config).unwrap();
    let mut pipe = DynamicPipeline::new(&device, &config, t.batch, t.seq).unwrap();
    let first = pipe.forward_backward(&params, &mut grads, &inputs, &targets, 1.0).unwrap();
    assert_eq!(first, dynamic[0], "the bound is computed on the runs' first batch");
    let bound: f64 = grads.as_slice().iter().zip(params.as_slice()).map(|(g, w)| f64::from((g * w).abs())).sum::<f64>()
        * 2f64.powi(-11);
    let tolerance = 4.0 * bound;
    assert!(tolerance < 1e-2 * f64::from(first), "the bound {bound} is too loose to test anything");
    for (k, ((d, s), e)) in dynamic.iter().zip(&stat).zip(&extras).enumerate() {
        let (d, s, e) = (f64::from(*d), f64::from(*s), f64::from(*e));
        assert!((s - d).abs() <= tolerance, "step {}: static {s}, dynamic {d} (tolerance {tolerance:e})", k + 1);
        assert!((e - d).abs() <= tolerance, "step {}: static+extras {e}, dynamic {d} (tolerance {tolerance:e})", k + 1);
    }
    // And the runs learned (so equal losses are not equal non-movement).
    assert!(dynamic[7] < dynamic[0] - 0.3, "{dynamic:?}");
}

#[test]
fn accumulated_micro_batches_share_one_compile() {
    let config = tiny(2, false);
    let device = CpuDevice::new(Precision::Fp32);
    let (steps, accum) = (4, 3);
    let (_, trainer) =
        run(&device, &config, PipelineConfig::new(PipelineKind::Static, false), settings(steps, 2, 8, accum));
    // 5 kernels per layer per compile; the first set and the weight-free attention
    // backward at the start, then one compile per optimizer step after the first (which
    // uses the first set) — not one per micro-batch.
    let per_compile = 5 * config.n_layers;
    assert_eq!(trainer.kernels_per_compile(), per_compile);
    let expected = per_compile + 1 + (steps as usize - 1) * per_compile;
    assert_eq!(device.compiles_done(), expected, "compiles counted by the device");
    assert_eq!(trainer.cumulative.compiles, expected as u64, "compiles counted by the trainer");
}

#[test]
fn double_buffer_trains_with_the_weights_of_one_step_before() {
    let config = tiny(2, true);
    let device = CpuDevice::new(Precision::Fp32);
    let t = settings(6, 2, 8, 2);
    let (losses, trainer) = run(&device, &config, PipelineConfig::new(PipelineKind::DoubleBuffer, false), t.clone());

    // The documented schedule, written out with the static pipeline and the optimizer:
    // step k's gradient is taken at W_{k-1} (W_0 at step 0) and applied to W_k.
    let mut current = Params::init(&config, 1).unwrap();
    let mut previous = current.clone();
    let data = dataset(config.vocab_size, t.seq);
    let decayed = current.layout().specs().iter().filter(|s| s.is_matrix()).map(|s| s.range()).collect();
    let adam_config = AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let mut adam = AdamW::new(adam_config, current.len(), decayed).unwrap();
    let mut scaler = LossScaler::disabled();
    let schedule = LrSchedule { max_lr: t.lr, min_lr: t.min_lr, warmup_steps: t.warmup, total_steps: t.steps };
    let mut sampler = Sampler::new(t.seed);
    let mut pipe = StaticPipeline::new(&device, &current, 0, t.batch, t.seq, StaticOptions::default()).unwrap();
    let mut grads = Params::zeros(&config).unwrap();
    let (mut inputs, mut targets) = (vec![0; t.batch * t.seq], vec![0; t.batch * t.seq]);
    let mut want = Vec::new();
    for k in 0..t.steps {
        let stale = if k == 0 { &current } else { &previous };
        pipe.ensure(&device, stale, k.saturating_sub(1)).unwrap();
        grads.as_mut_slice().fill(0.0);
        let mut sum = 0.0f64;
        for _ in 0..t.accum {
            data.sample_batch(&mut sampler, &mut inputs, &mut targets);
            sum += f64::from(pipe.forward_backward(stale, &mut grads, &inputs, &targets, 0.5).unwrap());
        }
        want.push((sum / t.accum as f64) as f32);
        previous.as_mut_slice().copy_from_slice(current.as_slice());
        let lr = schedule.lr(k);
        optim::step_with_scaling(&mut adam, &mut scaler, current.as_mut_slice(), grads.as_slice(), lr, t.clip);
    }
    assert_eq!(losses, want, "losses step by step");
    assert!(
        trainer.params.as_slice().iter().zip(current.as_slice()).all(|(a, b)| a.to_bits() == b.to_bits()),
        "the double-buffered run's parameters differ from the delayed-gradient schedule's"
    );
    // Not the static pipeline in disguise: without the delay the run ends elsewhere.
    let (_, stat) = run(&device, &config, PipelineConfig::new(PipelineKind::Static, false), t);
    assert_ne!(stat.params.as_slice(), trainer.params.as_slice());
}

#[test]
fn double_buffer_resumes_exactly_from_its_checkpoint() {
    let config = tiny(4, false);
    let device = CpuDevice::new(Precision::Fp32);
    let db = PipelineConfig::new(PipelineKind::DoubleBuffer, true);
    let (_, straight) = run(&device, &config, db, settings(6, 2, 8, 1));

    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt.bin");
    let (_, half) = run_steps(&device, &config, db, settings(6, 2, 8, 1), 3);
    half.save(&ckpt).unwrap();
    let data = dataset(config.vocab_size, 8);
    let mut resumed = Trainer::resume(&device, &ckpt, None, data, None).unwrap();
    assert_eq!(resumed.pipeline_config(), db, "the checkpoint keeps the pipeline");
    let mut telemetry = Telemetry::none();
    while resumed.step < 6 {
        resumed.step(&mut telemetry).unwrap();
    }
    assert!(
        straight.params.as_slice().iter().zip(resumed.params.as_slice()).all(|(a, b)| a.to_bits() == b.to_bits()),
        "a resumed double-buffered run must continue with the same stale weights"
    );
}

#[test]
fn double_buffer_hides_the_compile_latency() {
    // With every compile taking ≥ 1 ms more, the static pipeline waits 10 × 1 ms per
    // step for its 10 kernels; the double-buffered one compiles them while a step of
    // 16 × 128 tokens trains (several times longer), so it waits only where a compile
    // outlasts a step. The bar: its total stall under 10 % of the static
    // pipeline's compile time.
    let config = Config { seq_len: 128, vocab_size: 64, ..tiny(2, false) };
    let t = settings(6, 16, 128, 1);
    let stat_device = CpuDevice::new(Precision::Fp32).with_sim_compile_ms(1);
    let (_, stat) = run(&stat_device, &config, PipelineConfig::new(PipelineKind::Static, false), t.clone());
    let db_device = CpuDevice::new(Precision::Fp32).with_sim_compile_ms(1);
    let (_, db) = run(&db_device, &config, PipelineConfig::new(PipelineKind::DoubleBuffer, false), t);
    let static_compile = stat.cumulative.compile_seconds;
    let stall = db.cumulative.compile_stall_seconds;
    // The static pipeline compiled 6 sets of 10 kernels (+1), each ≥ 1 ms: ≥ 61 ms.
    assert!(static_compile >= 0.061, "static compile time {static_compile} s");
    assert_eq!(db.cumulative.compiles, stat.cumulative.compiles, "both compile every step's kernels");
    assert!(stall < 0.1 * static_compile, "double-buffer stalled {stall} s against {static_compile} s of compile");
}
