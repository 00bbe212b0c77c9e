//! LoRA fine-tuning from the command line: `train --lora RANK` (or `--init-lora DIR`),
//! `export` of a LoRA checkpoint as a PEFT adapter folder or as a merged model, and the
//! `--lora DIR` of `sample` and `generate` (which merge the adapter into the weights in
//! memory: `W + s·B·A` once, then decode as usual).
//!
//! The run itself is `train::lora_trainer::LoraTrainer` on the LoRA pipeline
//! (docs/PIPELINES.md): the base is baked into the kernels once, so there is never a
//! recompile and never a restart.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use device::Precision;
use llama::Params;
use train::lora::{round_base_to_fp16, LoraConfig, LoraParams, DEFAULT_ALPHA};
use train::lora_trainer::{self, LoraTrainer};
use train::telemetry::{Event, PhasesMs, Telemetry};
use train::trainer::TrainConfig;

use crate::train_cmd::{ExportArgs, TrainArgs};

/// The LoRA flags of `anetrain train`.
#[derive(Args, Debug, Default, Clone)]
pub struct LoraArgs {
    /// Fine-tune LoRA adapters of this rank on the frozen --model (the LoRA pipeline:
    /// the base baked into the kernels, compiled once; only the adapters train).
    #[arg(long, value_name = "RANK")]
    pub lora: Option<usize>,
    /// LoRA's alpha: the adapters' product is scaled by alpha / rank [default: 8, as PEFT].
    #[arg(long, value_name = "ALPHA")]
    pub lora_alpha: Option<f32>,
    /// Dropout probability on the adapters' input, as PEFT's lora_dropout [default: 0].
    #[arg(long, value_name = "P")]
    pub lora_dropout: Option<f32>,
    /// Projections to adapt, some of q,k,v,o,gate,up,down (or `all`) [default: q,v].
    #[arg(long, value_name = "LIST")]
    pub lora_targets: Option<String>,
    /// Start from this PEFT adapter folder (adapter_config.json and
    /// adapter_model.safetensors; its rank, alpha and targets) instead of fresh adapters.
    #[arg(long, value_name = "DIR")]
    pub init_lora: Option<PathBuf>,
}

impl LoraArgs {
    /// True when the run is a LoRA run.
    pub fn enabled(&self) -> bool {
        self.lora.is_some() || self.init_lora.is_some()
    }

    fn any_setting(&self) -> bool {
        self.lora.is_some() || self.lora_alpha.is_some() || self.lora_dropout.is_some() || self.lora_targets.is_some()
    }
}

/// The LoRA flags of `anetrain export`.
#[derive(Args, Debug, Default, Clone)]
pub struct LoraExportArgs {
    /// From a LoRA checkpoint: write its adapters as a PEFT folder
    /// (adapter_model.safetensors + adapter_config.json).
    #[arg(long, value_name = "DIR")]
    pub lora_adapter: Option<PathBuf>,
    /// From a LoRA checkpoint: write the merged model (W + alpha/r · B·A) with --to or --to-hf.
    #[arg(long)]
    pub merge_lora: bool,
    /// Merge this PEFT adapter folder into the exported model.
    #[arg(long, value_name = "DIR", conflicts_with = "merge_lora")]
    pub lora: Option<PathBuf>,
}

/// A base model for LoRA: a preset (random), a llama2.c model.bin, an anetrain
/// checkpoint, or a Hugging Face folder.
fn load_base(spec: &str, seed: u64, tokenizer_vocab: Option<usize>) -> Result<Params> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(llama::hf::read_model(path).with_context(|| format!("--model {spec}"))?.params);
    }
    crate::train_cmd::initial_params(spec, seed, tokenizer_vocab)
}

/// Reads a PEFT folder's adapters for `params`' shape, naming the flag on error.
pub fn read_adapter(dir: &Path, params: &Params, flag: &str) -> Result<LoraParams> {
    train::peft::read_adapter(dir, params.config()).with_context(|| format!("{flag} {}", dir.display()))
}

/// `anetrain train --lora RANK …`.
pub fn run(args: TrainArgs) -> Result<()> {
    let process_start = std::time::Instant::now();
    let (device, io) = crate::train_cmd::training_device(&args)?;
    if args.pipeline.is_some() || args.ane_extras {
        bail!("--lora trains with its own pipeline (the base baked once, adapters in the surfaces): drop --pipeline and --ane-extras");
    }
    if args.sim_compile_limit.is_some_and(|n| n == 0) {
        bail!("--sim-compile-limit 0 allows no compile at all");
    }
    for stale in train::checkpoint::remove_stale_temps(&args.ckpt) {
        eprintln!("note: removed {}, a checkpoint write that an ended process left unfinished", stale.display());
    }
    let resuming = args.resume && args.ckpt.exists();
    if args.ckpt.is_file() && !args.resume && !args.overwrite {
        bail!(
            "--ckpt {} already exists: continue it with --resume, or pass --overwrite to replace it",
            args.ckpt.display()
        );
    }
    if resuming && !lora_trainer::is_lora_checkpoint(&args.ckpt) {
        bail!(
            "--resume: {} is not a LoRA checkpoint (drop --lora to continue a full training run)",
            args.ckpt.display()
        );
    }
    if resuming && (args.lora.any_setting() || args.lora.init_lora.is_some()) {
        let s = lora_trainer::read_summary(&args.ckpt)?;
        if args.lora.lora.is_some_and(|r| r != s.lora.rank) {
            bail!(
                "--lora {}: the checkpoint trains rank {}; a resumed run keeps it",
                args.lora.lora.unwrap_or(0),
                s.lora.rank
            );
        }
        if args.lora.init_lora.is_some() {
            bail!("--init-lora with --resume: the checkpoint already holds the adapters");
        }
    }
    train::checkpoint::check_writable(&args.ckpt).context("--ckpt: cannot write a checkpoint there")?;
    let given_tokenizer = match &args.tokenizer {
        Some(p) => Some(llama::Tokenizer::read(p)?),
        None => {
            // The base's tokenizer: beside the checkpoint when resuming, else beside the model.
            let beside = if resuming {
                args.ckpt.with_file_name("tokenizer.bin")
            } else {
                Path::new(&args.model).with_file_name("tokenizer.bin")
            };
            beside.is_file().then(|| llama::Tokenizer::read(&beside)).transpose()?
        }
    };
    let builtin = args.data.is_empty();
    let tokenizer_vocab = match (&given_tokenizer, builtin) {
        (Some(t), _) => Some(t.vocab_size()),
        (None, true) => Some(crate::train_cmd::BUILTIN_VOCAB),
        (None, false) => None,
    };

    let mut trainer = if resuming {
        let s = lora_trainer::read_summary(&args.ckpt)?;
        let data = crate::train_cmd::load_data(&args, &s.config, s.train.seq, given_tokenizer.clone())?;
        let steps = args.gave("steps").then_some(args.steps);
        let t = LoraTrainer::resume(device.as_ref(), &args.ckpt, steps, data.train, data.val)?;
        (t, data.tokenizer)
    } else {
        let mut base = load_base(&args.model, args.seed, tokenizer_vocab)?;
        // The kernels bake the projections as fp16: the host holds the same numbers, so
        // exports and the CPU's parts of the model see the base the kernels compute with.
        round_base_to_fp16(&mut base);
        let config = base.config().clone();
        let seq = args.seq.unwrap_or(config.seq_len.min(256));
        if seq == 0 || seq > config.seq_len {
            bail!("--seq {seq}: must be between 1 and the model's context of {} tokens", config.seq_len);
        }
        let lora = match &args.lora.init_lora {
            Some(dir) => {
                let lora = read_adapter(dir, &base, "--init-lora")?;
                if args.lora.any_setting() {
                    let c = &lora.config;
                    let clash = args.lora.lora.is_some_and(|r| r != c.rank)
                        || args.lora.lora_alpha.is_some_and(|a| a != c.alpha)
                        || args
                            .lora
                            .lora_targets
                            .as_deref()
                            .is_some_and(|t| LoraConfig::parse_targets(t).ok().as_ref() != Some(&c.targets));
                    if clash {
                        bail!(
                            "--init-lora {}: the adapter is rank {}, alpha {}, targets {}; drop --lora/--lora-alpha/--lora-targets or match them",
                            dir.display(),
                            c.rank,
                            c.alpha,
                            c.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
                        );
                    }
                }
                let mut lora = lora;
                if let Some(p) = args.lora.lora_dropout {
                    lora.config.dropout = p;
                }
                lora
            }
            None => {
                let rank = args.lora.lora.expect("enabled");
                let targets = match &args.lora.lora_targets {
                    Some(list) => {
                        LoraConfig::parse_targets(list).map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?
                    }
                    None => train::lora::DEFAULT_TARGETS.to_vec(),
                };
                let cfg = LoraConfig {
                    rank,
                    alpha: args.lora.lora_alpha.unwrap_or(DEFAULT_ALPHA),
                    dropout: args.lora.lora_dropout.unwrap_or(0.0),
                    targets,
                };
                cfg.validate(&config).map_err(anyhow::Error::msg)?;
                LoraParams::init(&config, &cfg, args.seed)
            }
        };
        lora.config.validate(&config).map_err(anyhow::Error::msg)?;
        let data = crate::train_cmd::load_data(&args, &config, seq, given_tokenizer)?;
        let settings = TrainConfig {
            steps: args.steps,
            lr: args.lr,
            min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
            warmup: args.warmup,
            batch: args.batch,
            accum: args.accum,
            seq,
            clip: args.clip,
            weight_decay: args.weight_decay,
            beta1: args.beta1,
            beta2: args.beta2,
            eps: args.eps,
            eval_every: args.eval_every,
            eval_batches: args.eval_batches,
            ckpt_every: args.ckpt_every,
            seed: args.seed,
            loss_scaling: device.precision() == Precision::Fp16,
        };
        let t = LoraTrainer::new(device.as_ref(), base, lora, settings, io, data.train, data.val)?;
        (t, data.tokenizer)
    };
    let (trainer, tokenizer) = (&mut trainer.0, trainer.1);
    if let Some(t) = &tokenizer {
        let path = args.ckpt.with_file_name("tokenizer.bin");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        t.write(&path)?;
    }
    let mut telemetry = match &args.telemetry {
        Some(p) => Telemetry::open(p).with_context(|| format!("--telemetry {}", p.display()))?,
        None => Telemetry::none(),
    };
    telemetry.emit(&trainer.start_event(args.precision.name(), resuming))?;
    let last = args.stop_after.map_or(trainer.train.steps, |k| k.min(trainer.train.steps));
    let c = &trainer.lora.config;
    eprintln!(
        "LoRA fine-tuning {} ({:.2} M frozen params, {:.3} M trainable: rank {}, alpha {}, targets {}) on {} ({}): \
         {} steps of {}×{} tokens, {} kernels compiled once{}",
        if resuming { args.ckpt.display().to_string() } else { args.model.clone() },
        trainer.base().len() as f64 / 1e6,
        trainer.lora.len() as f64 / 1e6,
        c.rank,
        c.alpha,
        c.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
        device.name(),
        args.precision.name(),
        trainer.train.steps,
        trainer.train.batch * trainer.train.accum,
        trainer.train.seq,
        trainer.kernels(),
        if resuming { format!(", resuming after step {}", trainer.step) } else { String::new() }
    );
    let bar = crate::train_cmd::progress_bar(
        args.quiet || args.telemetry.as_deref() == Some(Path::new("-")),
        trainer.step,
        last,
    );
    let cumulative_wall = trainer.cumulative.wall_seconds;
    let mut last_val = None;
    while trainer.step < last {
        let info = trainer.step(&mut telemetry)?;
        let step = trainer.step;
        if trainer.eval_due(step) {
            if let Some(v) = trainer.evaluate()? {
                telemetry.emit(&Event::Eval { step, val_loss: v })?;
                last_val = Some(v);
            }
        }
        trainer.cumulative.wall_seconds = cumulative_wall + process_start.elapsed().as_secs_f64();
        if trainer.train.ckpt_every > 0 && step.is_multiple_of(trainer.train.ckpt_every) && step < last {
            trainer.save(&args.ckpt)?;
            telemetry.emit(&Event::Checkpoint { step, path: args.ckpt.display().to_string() })?;
        }
        bar.set_position(step);
        bar.set_message(format!(
            "loss {:.4}{}  {:.0} tok/s",
            info.loss,
            last_val.map_or(String::new(), |v: f32| format!("  val {v:.4}")),
            info.tokens_per_s
        ));
    }
    bar.finish_and_clear();
    trainer.cumulative.wall_seconds = cumulative_wall + process_start.elapsed().as_secs_f64();
    trainer.save(&args.ckpt)?;
    telemetry.emit(&Event::Checkpoint { step: trainer.step, path: args.ckpt.display().to_string() })?;
    let report = trainer.report();
    telemetry.emit(&Event::End { report })?;
    eprintln!("{report}");
    eprintln!(
        "checkpoint: {} (step {}{}); export the adapter with `anetrain export {} --lora-adapter DIR`",
        args.ckpt.display(),
        trainer.step,
        last_val.map_or(String::new(), |v| format!(", val loss {v:.4}")),
        args.ckpt.display()
    );
    if args.sample_steps > 0 {
        if let Some(t) = &tokenizer {
            let merged = trainer.lora.merge(trainer.base());
            crate::train_cmd::print_sample(device.as_ref(), &merged, t, args.sample_steps, args.seed)?;
        }
    }
    Ok(())
}

/// `anetrain export` of a LoRA checkpoint, or of any model with `--lora DIR` merged.
pub fn export(args: &ExportArgs) -> Result<()> {
    let l = &args.lora;
    if lora_trainer::is_lora_checkpoint(&args.model) {
        let ckpt = lora_trainer::load_lora_checkpoint(&args.model)?;
        if let Some(dir) = &l.lora_adapter {
            let base_name = args.model.display().to_string();
            train::peft::write_adapter(dir, ckpt.base.config(), &ckpt.lora, Some(&base_name))?;
            eprintln!(
                "wrote {} (PEFT LoRA adapter: rank {}, {} tensors)",
                dir.display(),
                ckpt.lora.config.rank,
                2 * ckpt.lora.slots().len()
            );
        }
        if l.merge_lora {
            let merged = ckpt.lora.merge(&ckpt.base);
            return crate::train_cmd::export_params(args, &merged);
        }
        if l.lora_adapter.is_none() {
            bail!(
                "{} is a LoRA checkpoint: give --lora-adapter DIR and/or --merge-lora with --to or --to-hf",
                args.model.display()
            );
        }
        return Ok(());
    }
    if l.lora_adapter.is_some() || l.merge_lora {
        bail!(
            "--lora-adapter and --merge-lora need a LoRA checkpoint (from `train --lora`); {} is not one",
            args.model.display()
        );
    }
    let mut params = crate::load_model(&args.model)?;
    if let Some(dir) = &l.lora {
        read_adapter(dir, &params, "--lora")?.merge_into(&mut params);
    }
    crate::train_cmd::export_params(args, &params)
}

/// Surface bytes one training step moves through the ANE on paper (`ios18`: fp32
/// surfaces), the weights inside the dynamic pipeline's surfaces included: the dynamic
/// pipeline's six kernels and the LoRA pipeline's per-layer kernels, each evaluated once
/// per layer and micro-batch (the classifier runs on the CPU in both).
fn ane_bytes_per_step(config: &llama::Config, lora: &LoraConfig, batch: usize, seq: usize) -> Result<(f64, f64)> {
    use train::cost_model::KernelWork;
    use train::kernels::{self, LayerDims};
    use train::lora_kernels as lk;
    use train::static_kernels as sk;
    let dialect = mil::Dialect::Ios18;
    let d = LayerDims::of(config);
    let t = batch * seq;
    let io = |def: &train::kernels::KernelDef| KernelWork::of_program(def.name, &def.program).io_bytes();
    let dynamic = [
        kernels::qkv_forward(&d, t, dialect)?,
        kernels::attention_forward(&d, batch, seq, dialect)?,
        kernels::ffn_forward(&d, t, dialect)?,
        kernels::ffn_backward(&d, t, dialect)?,
        kernels::attention_backward(&d, batch, seq, dialect)?,
        kernels::qkv_backward(&d, t, dialect)?,
    ];
    let full: f64 = dynamic.iter().map(io).sum::<f64>() * config.n_layers as f64;
    // One layer's LoRA kernels (the baked values do not change the surfaces).
    let (dim, kv, hid) = (d.dim, d.kv_dim(), d.hidden);
    let w = |n: usize| vec![0.0f32; n];
    let (rms, wq, wk, wv, wo) = (w(dim), w(dim * dim), w(kv * dim), w(kv * dim), w(dim * dim));
    let (w1, w2, w3) = (w(hid * dim), w(dim * hid), w(hid * dim));
    let aw = sk::AttentionWeights { rms: &rms, wq: &wq, wk: &wk, wv: &wv, wo: &wo, bias: None };
    let fw = sk::FfnWeights { rms: &rms, w1: &w1, w2: &w2, w3: &w3 };
    let ad = lk::Adapters::new(&lora.targets, lora.rank).with_dropout(lora.dropout > 0.0);
    let tg = &lora.targets;
    let mut defs = vec![
        lk::attention_forward(&d, batch, seq, 1e-5, &aw, &ad, dialect)?,
        lk::ffn_forward(&d, t, 1e-5, &fw, &ad, dialect)?,
        lk::ffn_backward(&d, t, &fw, &ad, dialect)?,
        lk::attention_backward_wo(&d, t, &wo, &ad, dialect)?,
        sk::attention_backward_free(&d, batch, seq, dialect)?,
        lk::qkv_backward(&d, t, &aw, &ad, dialect)?,
    ];
    let (attn, ffn): (Vec<_>, Vec<_>) = tg.iter().partition(|t| t.is_attention());
    for g in [attn, ffn].into_iter().filter(|g| !g.is_empty()) {
        defs.push(lk::adapter_grads(&d, t, &lk::Adapters { targets: &g, ..ad }, dialect)?);
    }
    let lora_bytes: f64 = defs.iter().map(io).sum::<f64>() * config.n_layers as f64;
    Ok((full, lora_bytes))
}

/// `anetrain bench train --lora RANK --device ane-model`: one step of full fine-tuning
/// (the dynamic pipeline as anetrain runs it) and of LoRA fine-tuning, predicted by the
/// ANE cost model (`train::cost_model`: `plan`, `lora_plan`) on a chip; nothing runs.
pub fn bench_ane_model(
    spec: &str,
    rank: usize,
    batch: usize,
    seq: usize,
    chip: &str,
    probe_json: Option<&Path>,
) -> Result<()> {
    use train::cost_model::{self, Chip, Fusions, StepShape};
    use train::pipelines::{PipelineConfig, PipelineKind};
    let config = crate::bench::model_or_preset_config(spec)?;
    if seq == 0 || seq > config.seq_len {
        bail!("--seq {seq} must be between 1 and the model's context of {}", config.seq_len);
    }
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let lora_cfg = LoraConfig::new(rank);
    lora_cfg.validate(&config).map_err(anyhow::Error::msg)?;
    let Some(mut chip_model) = Chip::named(chip) else {
        bail!("--chip {chip}: not a chip the model knows ({})", cost_model::chip_names().join(", "));
    };
    if let Some(path) = probe_json {
        let report = crate::ane_model_cmd::read_probe(path)?;
        chip_model = chip_model.with_probe(&report, &path.display().to_string()).map_err(anyhow::Error::msg)?.0;
    }
    let shape = StepShape { config: config.clone(), batch, seq, dialect: chip_model.dialect(), accum: 1 };
    let full_plan = cost_model::plan(&shape, PipelineConfig::new(PipelineKind::Dynamic, false), &Fusions::new())?;
    let full = cost_model::predict(&full_plan, &chip_model);
    let lora = cost_model::predict(&cost_model::lora_plan(&shape, &lora_cfg)?, &chip_model);
    let n_adapter = LoraParams::zeros(&config, &lora_cfg).len();
    let (opt_full, opt_lora) =
        (cost_model::optimizer_ms(&config, &chip_model), cost_model::lora_optimizer_ms(n_adapter, &chip_model));
    println!(
        "bench train --lora {rank}: {spec}, batch {batch} × seq {seq}, on the ANE cost model of {}: predicted, not run on hardware",
        chip_model.label
    );
    println!("| | full fine-tuning (dynamic) | LoRA r={rank} (q,v) | LoRA / full |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, f: f64, l: f64, unit: &str| {
        println!("| {name} | {f:.2}{unit} | {l:.2}{unit} | {:.2}× |", l / f);
    };
    row("ms/step (without AdamW)", full.ms_per_step, lora.ms_per_step, "");
    row("ms/step with AdamW every step", full.ms_per_step + opt_full, lora.ms_per_step + opt_lora, "");
    row("ANE busy, ms", full.ane_ms(), lora.ane_ms(), "");
    row("ANE GFLOP", full.ane_flops / 1e9, lora.ane_flops / 1e9, "");
    row("CPU GEMM GFLOP", full.cpu_gemm_flops / 1e9, lora.cpu_gemm_flops / 1e9, "");
    println!("| evaluations per step | {} | {} | |", full.evals, lora.evals);
    println!();
    println!("LoRA kernels ({}):", lora.label);
    println!("  {:<32} {:>5} {:>9} {:>9} {:>12}", "kernel", "evals", "ms/eval", "ms/step", "bound");
    for r in &lora.kernels {
        println!(
            "  {:<32} {:>5} {:>9.3} {:>9.1} {:>12}",
            r.work.name,
            r.evals,
            r.time.total_ms(),
            r.total_ms(),
            r.time.bound()
        );
    }
    println!("  main thread: {}", lora.critical_path().trim_start_matches("main thread: "));
    Ok(())
}

/// `anetrain bench train --lora RANK`: full fine-tuning (dynamic pipeline) and LoRA
/// fine-tuning of the same model on the same random tokens, in alternating rounds on
/// one device; the fastest round of each is reported, with the optimizer-plus-gradient
/// memory of both and the ANE surface bytes per step on paper.
pub fn bench(spec: &str, rank: usize, batch: usize, seq: usize, steps: u64, rounds: usize) -> Result<()> {
    use train::trainer::Trainer;
    if steps == 0 || rounds == 0 {
        bail!("--steps and --rounds must be at least 1");
    }
    let params = crate::bench::model_or_preset(spec)?;
    let config = params.config().clone();
    if seq > config.seq_len {
        bail!("--seq {seq} is larger than the model's context of {}", config.seq_len);
    }
    let lora_cfg = LoraConfig::new(rank);
    lora_cfg.validate(&config).map_err(anyhow::Error::msg)?;
    let device = crate::devices::open_device(crate::devices::DeviceArg::Cpu, Precision::Fp32)?;
    let tokens = crate::bench::random_tokens(&config, batch, seq);
    let data = || train::data::Dataset::from_tokens("random tokens", tokens.clone(), config.vocab_size, seq);
    let settings = crate::bench::bench_settings(steps * rounds as u64 + 1, batch, seq, Precision::Fp32);
    let mut base = params.clone();
    round_base_to_fp16(&mut base);
    let lora = LoraParams::init(&config, &lora_cfg, 1);
    let n_params = params.len();
    let mut full = Trainer::new(device.as_ref(), params, settings.clone(), data()?, None)?;
    let mut lt =
        LoraTrainer::new(device.as_ref(), base, lora, settings, train::binding::IoConvention::Packed, data()?, None)?;
    let mut telemetry = Telemetry::none();
    full.step(&mut telemetry)?; // warm-up
    lt.step(&mut telemetry)?;
    let (mut best_full, mut best_lora) = (f64::INFINITY, f64::INFINITY);
    // Phase sums over every timed step, for the per-phase table (where the time goes).
    let (mut phases_full, mut phases_lora) = (PhasesMs::default(), PhasesMs::default());
    for _ in 0..rounds {
        let t0 = full.cumulative.train_seconds;
        for _ in 0..steps {
            full.step(&mut telemetry)?;
            phases_full.add(&full.last_phases);
        }
        best_full = best_full.min((full.cumulative.train_seconds - t0) / steps as f64 * 1e3);
        let t0 = lt.cumulative.train_seconds;
        for _ in 0..steps {
            lt.step(&mut telemetry)?;
            phases_lora.add(&lt.last_phases);
        }
        best_lora = best_lora.min((lt.cumulative.train_seconds - t0) / steps as f64 * 1e3);
    }
    // Full fine-tuning keeps a gradient and two AdamW moments per parameter (f32).
    let mem_full = 3.0 * 4.0 * n_params as f64;
    let mem_lora = lt.optimizer_and_gradient_bytes() as f64;
    let (ane_full, ane_lora) = ane_bytes_per_step(&config, &lora_cfg, batch, seq)?;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "bench train --lora {rank}: {spec}, batch {batch} × seq {seq}, CPU device (fp32), fastest of {rounds} round(s) of {steps} step(s)"
    );
    println!("| | full fine-tuning (dynamic) | LoRA r={rank} (q,v) | LoRA / full |");
    println!("|---|---:|---:|---:|");
    println!("| ms/step | {best_full:.1} | {best_lora:.1} | {:.2}× |", best_lora / best_full);
    println!(
        "| optimizer + gradient memory | {:.1} MiB | {:.2} MiB | {:.4}× |",
        mib(mem_full),
        mib(mem_lora),
        mem_lora / mem_full
    );
    println!(
        "| ANE surface bytes per step (on paper, ios18) | {:.1} MiB | {:.1} MiB | {:.2}× |",
        mib(ane_full),
        mib(ane_lora),
        ane_lora / ane_full
    );
    println!("| kernels compiled per run | 6 | {} | |", lt.kernels());
    let n = (steps * rounds as u64) as f64;
    println!();
    println!("mean ms per step and phase (all {} timed steps):", steps * rounds as u64);
    println!("| phase | full fine-tuning | LoRA r={rank} |");
    println!("|---|---:|---:|");
    for ((name, f), (_, l)) in phases_full.named().into_iter().zip(phases_lora.named()) {
        println!("| {name} | {:.1} | {:.1} |", f / n, l / n);
    }
    Ok(())
}
