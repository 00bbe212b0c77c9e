//! The ANE cost model against the published figures of the seed experiments.
//!
//! Each row is a measured ms/step for Stories110M (one sequence of 256 tokens per step,
//! forward and backward, the optimizer left out, as the seed times it), the chip it ran
//! on, where it was published, and the anetrain schedule that models the seed's pipeline
//! of that date. The model must land within ±25 % of every row; no constant is tuned per
//! row (the chip constants are in `train::cost_model`, sourced in docs/ANE.md).
//!
//! Not in the table: upstream's 412 ms/step for Qwen3-0.6B on M4 (README, 2026-03-10):
//! anetrain has no Qwen3 architecture yet (QK-norm, head_dim ≠ dim/heads).

use train::cost_model::{self, Chip, Fusion, Fusions, StepShape};
use train::pipelines::{PipelineConfig, PipelineKind};

/// Which seed pipeline a row measured, and the anetrain schedule that models it.
#[derive(Clone, Copy, Debug)]
enum Seed {
    /// `train_large`: weights baked (1×1 convs), classifier on the CPU, dW async on a GCD queue.
    Static,
    /// `train_large_ane` (PR #19): + classifier, softmax, final norm and norm backward on the ANE.
    StaticExtras,
    /// `training_dynamic` of 2026-03-04: weights in surfaces, classifier and RMSNorm on the
    /// CPU, dW async.
    DynamicMarch4,
    /// `training_dynamic` of 2026-03-10: + RMSNorm fused into the forward kernels,
    /// classifier and softmax on the ANE.
    DynamicMarch10,
}

impl Seed {
    fn schedule(self) -> (PipelineConfig, Fusions) {
        let set = |f: &[Fusion]| f.iter().copied().collect::<Fusions>();
        match self {
            Seed::Static => {
                (PipelineConfig::new(PipelineKind::Static, false), set(&[Fusion::AsyncDw, Fusion::ConvWeights]))
            }
            Seed::StaticExtras => {
                (PipelineConfig::new(PipelineKind::Static, true), set(&[Fusion::AsyncDw, Fusion::ConvWeights]))
            }
            Seed::DynamicMarch4 => (PipelineConfig::new(PipelineKind::Dynamic, false), set(&[Fusion::AsyncDw])),
            Seed::DynamicMarch10 => (
                PipelineConfig::new(PipelineKind::Dynamic, false),
                set(&[Fusion::RmsNorm, Fusion::Classifier, Fusion::AsyncDw, Fusion::StagedWeights]),
            ),
        }
    }
}

/// `(chip, seed pipeline, published ms/step, source)`. Ranges are taken at their middle.
const PUBLISHED: &[(&str, Seed, f64, &str)] = &[
    ("m1pro", Seed::Static, 155.5, "maderix/ANE benchmarks/ANE_BENCHMARK_REPORT.md: M1 Pro 148-163"),
    ("m1max", Seed::Static, 155.0, "maderix/ANE benchmarks/ANE_BENCHMARK_REPORT.md: M1 Max 143-167"),
    ("m3ultra", Seed::Static, 91.0, "maderix/ANE benchmarks/ANE_BENCHMARK_REPORT.md: M3 Ultra 91"),
    ("m4", Seed::Static, 106.7, "maderix/ANE training/README.md (20-step table): static 106.7"),
    ("m4pro", Seed::Static, 71.0, "maderix/ANE benchmarks/ANE_BENCHMARK_REPORT.md: M4 Pro 69-73"),
    ("m4max", Seed::Static, 64.0, "maderix/ANE benchmarks/ANE_BENCHMARK_REPORT.md: M4 Max 64"),
    ("m4max", Seed::Static, 72.4, "maderix/ANE docs/BENCHMARK_RESULTS.md (2026-03-03): train_large 72.4"),
    ("m5", Seed::Static, 110.5, "maderix/ANE benchmarks/ANE_BENCHMARK_REPORT.md: M5 101-120"),
    ("m4", Seed::StaticExtras, 91.8, "maderix/ANE training/README.md: PR#19 + ANE extras 91.8"),
    ("m4max", Seed::StaticExtras, 62.9, "maderix/ANE docs/BENCHMARK_RESULTS.md (2026-03-03): train_large_ane 62.9"),
    ("m4", Seed::DynamicMarch4, 111.0, "maderix/ANE training/README.md (20-step table): dynamic 111"),
    ("m4", Seed::DynamicMarch10, 91.0, "maderix/ANE README.md (2026-03-10): Stories110M dynamic 91"),
];

/// Rows the model cannot meet, with the reason (also in docs/ANE.md). Their error is
/// still printed, and must stay on the side the reason explains (the model too fast).
const KNOWN_MISSES: &[(&str, &str)] = &[
    (
        "m1pro",
        "M1's Neural Engine runs the seed's kernels at about half its rated 11 TOPS: the seed's \
         report gives 32-35 ms of ANE time per step where the model, at the rated figure, \
         gives 17 ms; no measured M1 peak exists (the peak benchmark does not compile there)",
    ),
    ("m1max", "as m1pro: the same Neural Engine (ANE time 35-45 ms per step in the seed's report)"),
];

/// Allowed relative error of each row.
const TOLERANCE: f64 = 0.25;

#[test]
fn the_model_reproduces_the_published_stories110m_figures() {
    let config = llama::Config::preset("stories110m").unwrap();
    let mut report = String::from(
        "chip     seed pipeline     modelled as                              published  predicted  error\n",
    );
    let mut misses = Vec::new();
    for &(chip_name, seed, published, source) in PUBLISHED {
        let chip = Chip::named(chip_name).unwrap();
        let shape = StepShape { config: config.clone(), batch: 1, seq: 256, dialect: chip.dialect(), accum: 10 };
        let (pipeline, fusions) = seed.schedule();
        let plan = cost_model::plan(&shape, pipeline, &fusions).unwrap();
        let predicted = cost_model::predict(&plan, &chip).ms_per_step;
        let error = predicted / published - 1.0;
        report.push_str(&format!(
            "{chip_name:<8} {:<17} {:<40} {published:>9.1} {predicted:>10.1} {:>+6.1} %   ({source})\n",
            format!("{seed:?}"),
            plan.label,
            100.0 * error
        ));
        let known = KNOWN_MISSES.iter().any(|(c, _)| *c == chip_name);
        if error.abs() > TOLERANCE && !known {
            misses.push(format!("{chip_name} {seed:?}: {:+.1} %", 100.0 * error));
        }
        if known && error > 0.0 {
            misses.push(format!("{chip_name} {seed:?}: {:+.1} %, not the known miss's direction", 100.0 * error));
        }
    }
    eprintln!("{report}");
    assert!(misses.is_empty(), "rows outside ±25 %: {misses:?}\n{report}");
}

/// The bar of issue 25 asks for ≤ 91 ms/step on M4 for Stories110M dynamic with the
/// upstream fusions priced in. The model does not reach it (docs/ANE.md says why): this
/// test pins what it does predict, so a change to the model or the kernels shows here.
/// Every fusion must pay, and all of them together must beat each alone.
#[test]
fn the_fusions_price_stories110m_dynamic_on_m4() {
    let config = llama::Config::preset("stories110m").unwrap();
    let chip = Chip::named("m4").unwrap();
    let shape = StepShape { config, batch: 1, seq: 256, dialect: chip.dialect(), accum: 10 };
    let pipeline = PipelineConfig::new(PipelineKind::Dynamic, false);
    let ms = |f: &[Fusion]| {
        let set: Fusions = f.iter().copied().collect();
        cost_model::predict(&cost_model::plan(&shape, pipeline, &set).unwrap(), &chip).ms_per_step
    };
    let base = ms(&[]);
    let all = ms(&Fusion::ALL);
    eprintln!("Stories110M dynamic on M4: {base:.1} ms/step as anetrain runs it, {all:.1} ms/step with every fusion");
    for f in Fusion::ALL {
        let with = ms(&[f]);
        eprintln!("  {:<15} {with:>7.1} ms/step ({:+.1} ms)", f.name(), with - base);
        assert!(with <= base + 1e-9, "{} makes the step slower", f.name());
        assert!(all <= with + 1e-9, "all fusions together are slower than {} alone", f.name());
    }
    assert!(all < 0.8 * base, "the fusions together save less than 20 %: {base:.1} → {all:.1}");
}

/// The plans mirror the pipelines: run the real dynamic and static pipelines on a
/// recording CPU device and compare, evaluation by evaluation, the programs they ran with
/// the kernels the plan evaluates (FLOPs and surface bytes read from each program).
#[test]
fn the_plans_evaluate_what_the_pipelines_evaluate() {
    use device::{Device, Kernel, Surface};
    use std::sync::{Arc, Mutex};

    struct Recording {
        inner: device::cpu::CpuDevice,
        programs: Mutex<Vec<mil::Program>>,
        log: Arc<Mutex<Vec<usize>>>,
    }
    struct RecordingKernel {
        inner: Box<dyn Kernel>,
        id: usize,
        log: Arc<Mutex<Vec<usize>>>,
    }
    impl Kernel for RecordingKernel {
        fn inputs(&self) -> &[mil::Var] {
            self.inner.inputs()
        }
        fn outputs(&self) -> &[mil::Var] {
            self.inner.outputs()
        }
        fn eval(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> device::Result<()> {
            self.log.lock().unwrap().push(self.id);
            self.inner.eval(inputs, outputs)
        }
    }
    impl Device for Recording {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn dialect(&self) -> mil::Dialect {
            self.inner.dialect()
        }
        fn precision(&self) -> device::Precision {
            self.inner.precision()
        }
        fn compile(&self, program: &mil::Program, weights: &device::Weights) -> device::Result<Box<dyn Kernel>> {
            let inner = self.inner.compile(program, weights)?;
            let mut programs = self.programs.lock().unwrap();
            programs.push(program.clone());
            Ok(Box::new(RecordingKernel { inner, id: programs.len() - 1, log: self.log.clone() }))
        }
        fn compiles_left(&self) -> Option<usize> {
            None
        }
        fn compiles_done(&self) -> usize {
            self.programs.lock().unwrap().len()
        }
    }

    let config = llama::Config::preset("tiny").unwrap();
    let (batch, seq) = (2, 32);
    let params = llama::Params::init(&config, 1).unwrap();
    let tokens: Vec<u32> = (0..(batch * seq) as u32).map(|i| 3 + i * 7 % 500).collect();
    for pipeline in [
        PipelineConfig::new(PipelineKind::Dynamic, false),
        PipelineConfig::new(PipelineKind::Static, false),
        PipelineConfig::new(PipelineKind::Static, true),
    ] {
        let dev = Recording {
            inner: device::cpu::CpuDevice::new(device::Precision::Fp32),
            programs: Mutex::new(Vec::new()),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let mut grads = llama::Params::zeros(&config).unwrap();
        if pipeline.kind == PipelineKind::Dynamic {
            let mut p = train::pipeline::DynamicPipeline::new(&dev, &config, batch, seq).unwrap();
            p.forward_backward(&params, &mut grads, &tokens, &tokens, 1.0).unwrap();
        } else {
            let options =
                train::static_pipeline::StaticOptions { ane_extras: pipeline.ane_extras, ..Default::default() };
            let mut p = train::static_pipeline::StaticPipeline::new(&dev, &params, 0, batch, seq, options).unwrap();
            p.forward_backward(&params, &mut grads, &tokens, &tokens, 1.0).unwrap();
        }
        let programs = dev.programs.lock().unwrap();
        let ran: Vec<cost_model::KernelWork> =
            dev.log.lock().unwrap().iter().map(|&id| cost_model::KernelWork::of_program("", &programs[id])).collect();

        let shape = StepShape { config: config.clone(), batch, seq, dialect: dev.dialect(), accum: 1 };
        let plan = cost_model::plan(&shape, pipeline, &Fusions::new()).unwrap();
        let planned: Vec<&cost_model::KernelWork> = plan
            .tasks
            .iter()
            .filter_map(|t| match t {
                cost_model::Task::Eval(k) => Some(&plan.kernels[*k]),
                _ => None,
            })
            .collect();
        assert_eq!(ran.len(), planned.len(), "{}: evaluations per step", pipeline.label());
        for (i, (r, p)) in ran.iter().zip(&planned).enumerate() {
            let key = |w: &cost_model::KernelWork| (w.matmul_flops, w.elementwise_ops, w.input_bytes, w.output_bytes);
            assert_eq!(
                key(r),
                key(p),
                "{}: evaluation {i} ran another program than the plan's {}",
                pipeline.label(),
                p.name
            );
        }
    }

    // The LoRA pipeline, for target sets that take each of layer 0's early exits, and
    // with dropout masks.
    for (targets, dropout) in [("q,v", 0.0), ("o,down", 0.1), ("up", 0.0), ("q,k,v,o,gate,up,down", 0.2)] {
        let dev = Recording {
            inner: device::cpu::CpuDevice::new(device::Precision::Fp32),
            programs: Mutex::new(Vec::new()),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let lora_cfg = train::lora::LoraConfig {
            targets: train::lora::LoraConfig::parse_targets(targets).unwrap(),
            dropout,
            ..train::lora::LoraConfig::new(4)
        };
        let lora = train::lora::LoraParams::init(&config, &lora_cfg, 2);
        let io = train::binding::IoConvention::Packed;
        let mut p = train::lora_pipeline::LoraPipeline::new(&dev, params.clone(), &lora_cfg, batch, seq, io).unwrap();
        p.set_dropout_seed(Some(3));
        let mut grads = vec![0.0f32; lora.len()];
        p.forward_backward(&lora, &mut grads, &tokens, &tokens, 1.0).unwrap();
        let programs = dev.programs.lock().unwrap();
        let ran: Vec<cost_model::KernelWork> =
            dev.log.lock().unwrap().iter().map(|&id| cost_model::KernelWork::of_program("", &programs[id])).collect();
        let shape = StepShape { config: config.clone(), batch, seq, dialect: dev.dialect(), accum: 1 };
        let plan = cost_model::lora_plan(&shape, &lora_cfg).unwrap();
        let planned: Vec<&cost_model::KernelWork> = plan
            .tasks
            .iter()
            .filter_map(|t| match t {
                cost_model::Task::Eval(k) => Some(&plan.kernels[*k]),
                _ => None,
            })
            .collect();
        assert_eq!(ran.len(), planned.len(), "LoRA {targets}: evaluations per step");
        for (i, (r, p)) in ran.iter().zip(&planned).enumerate() {
            let key = |w: &cost_model::KernelWork| (w.matmul_flops, w.elementwise_ops, w.input_bytes, w.output_bytes);
            assert_eq!(key(r), key(p), "LoRA {targets}: evaluation {i} ran another program than the plan's {}", p.name);
        }
    }
}
