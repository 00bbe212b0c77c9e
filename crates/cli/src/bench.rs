//! `anetrain bench …`: benchmarks that print figures and ratios measured in the same run.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use device::Precision;
use rayon::prelude::*;
use train::model::Decoder;

use crate::devices::{open_device, DeviceArg};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// CPU device matmul and 1×1 conv at transformer shapes against the best GEMM this
    /// machine runs (the GEMM crate called directly), and per-op dispatch overhead.
    Gemm(GemmBench),
    /// Training speed of a random model on random tokens: ms/step, tokens/s, GFLOP/s
    /// against this machine's GEMM peak, and peak memory against the theoretical minimum.
    Train(TrainBench),
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
        /// llama2.c's `run` binary: run it on the same model (written to a temporary
        /// llama2.c model.bin) and prompt text, interleaved with anetrain, check that the
        /// greedy texts agree and print both speeds (see README).
        #[arg(long)]
        against: Option<std::path::PathBuf>,
        /// llama2.c tokenizer.bin for --against; default: tokenizer.bin beside `run`.
        #[arg(long)]
        tokenizer: Option<std::path::PathBuf>,
        /// Prompt text for --against (instead of --prompt's token count).
        #[arg(long, default_value = crate::bench_against::DEFAULT_TEXT)]
        prompt_text: String,
        /// Rounds of each side for --against.
        #[arg(long, default_value_t = 3, value_parser = positive)]
        rounds: usize,
    },
    /// The training pipelines side by side on the CPU device, the same steps of one
    /// model each: wall, compile and train time, ms/step, kernels per compile.
    Pipelines {
        #[arg(long, default_value = "tiny")]
        model: String,
        #[arg(long, default_value_t = 20)]
        steps: u64,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence; default: the model's context, at most 128.
        #[arg(long)]
        seq: Option<usize>,
        /// Make every compile take at least this long, as the ANE's do (tens to hundreds
        /// of ms); 0: the CPU device's own compile time.
        #[arg(long, default_value_t = 0)]
        sim_compile_ms: u64,
        #[arg(long, default_value = "fp32")]
        precision: Precision,
    },
    /// `anetrain serve` in this process, driven by N streaming clients against one:
    /// aggregate tokens/s, TTFT and inter-token latency p50/p99, and their ratio.
    Serve(crate::serve::bench::ServeBench),
}

#[derive(Args, Debug)]
pub struct GemmBench {
    /// Positions S per surface, comma-separated: each shape is measured at every length.
    /// 256 is one sequence; the training pipelines run `batch × seq` positions per kernel
    /// (2048 for Stories15M at batch 8).
    #[arg(long, value_delimiter = ',', default_value = "256", value_parser = positive)]
    seq: Vec<usize>,
    /// Milliseconds of timed runs per shape (after warm-up; at least 3 runs each). The
    /// cases of a shape run in turn, so a longer time steadies the medians on a machine
    /// whose speed drifts.
    #[arg(long, default_value_t = 2000, value_parser = positive)]
    time_ms: usize,
}

/// A clap parser for counts that must be at least 1.
pub(crate) fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a count: {e}")),
    }
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Gemm(args) => {
            let cfg = device::cpu::GemmBenchConfig {
                seqs: args.seq,
                time_per_case: std::time::Duration::from_millis(args.time_ms as u64),
                ..Default::default()
            };
            print!("{}", device::cpu::format_gemm_bench(&device::cpu::bench_gemm(&cfg)));
            Ok(())
        }
        BenchCommand::Train(args) => bench_train(&args),
        BenchCommand::Sample { model, prompt, decode, device, precision, against, tokenizer, prompt_text, rounds } => {
            match against {
                Some(run) => {
                    let params = model_or_preset(&model)?;
                    let tokenizer = tokenizer.unwrap_or_else(|| crate::bench_against::default_tokenizer(&run));
                    let against = crate::bench_against::Against {
                        run: &run,
                        tokenizer: &tokenizer,
                        text: &prompt_text,
                        decode,
                        rounds,
                    };
                    crate::bench_against::bench_against(&params, &model, device, precision, &against)
                }
                None => bench_sample(&model, prompt, decode, device, precision),
            }
        }
        BenchCommand::Pipelines { model, steps, batch, seq, sim_compile_ms, precision } => {
            bench_pipelines(&model, steps, batch, seq, sim_compile_ms, precision)
        }
        BenchCommand::Serve(args) => crate::serve::bench::run(args),
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

/// The config of a preset or a model file (`bench train --device ane-model` needs no weights).
pub fn model_or_preset_config(spec: &str) -> Result<llama::Config> {
    match llama::Config::preset(spec) {
        Some(config) => Ok(config),
        None => Ok(model_or_preset(spec)?.config().clone()),
    }
}

/// Read bandwidth of this machine in GB/s: all threads summing a buffer far larger than
/// the caches, best of a few runs. The sum keeps 16 independent lanes so the compiler
/// vectorises it (one running f32 sum would make this a latency test, not a bandwidth one).
pub fn read_bandwidth_gbs() -> f64 {
    const BYTES: usize = 512 << 20;
    const LANES: usize = 16;
    let data = vec![1.0f32; BYTES / 4];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: f32 = data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0.0f32; LANES];
                for block in c.chunks_exact(LANES) {
                    for (a, &x) in acc.iter_mut().zip(block) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
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
    // Decoding one token reads every weight once.
    let n_params = config.n_params();
    let bytes_per_token = decode_bytes_per_token(&config, device.dialect());
    let roofline = bandwidth * 1e9 / bytes_per_token as f64;
    let decode_rate = decode as f64 / decode_s;
    println!(
        "bench sample: {spec} ({:.1} M params) on {} ({})",
        n_params as f64 / 1e6,
        device.name(),
        precision.name()
    );
    println!("  prefill   {prompt:>5} tokens  {:>9.1} tokens/s", prompt as f64 / prefill_s);
    println!("  decode    {decode:>5} tokens  {:>9.1} tokens/s", decode_rate);
    println!("  memory read bandwidth        {bandwidth:>9.1} GB/s (measured now)");
    println!("  weight bytes per token       {:>9.1} MB", bytes_per_token as f64 / 1e6);
    println!("  decode roofline              {roofline:>9.1} tokens/s");
    println!("  decode / roofline            {:>9.1} %", 100.0 * decode_rate / roofline);
    Ok(())
}

/// Weight bytes a decode step reads: the packed layer surfaces and the classifier, in the
/// surfaces' dtype (the embedding rows read per token are negligible).
pub fn decode_bytes_per_token(config: &llama::Config, dialect: mil::Dialect) -> usize {
    let io_bytes = match dialect {
        mil::Dialect::Ios18 => 4,
        mil::Dialect::Ios16 => 2,
    };
    let embedding = config.vocab_size * config.dim;
    (config.n_params() - if config.shared_classifier { 0 } else { embedding }) * io_bytes
}

/// Reference figures from another run on this kind of machine (2 cores, fp32, batch 8 ×
/// seq 256 for stories15m, 4 × 256 for stories110m): PyTorch 2.x running llama2.c's
/// model.py, tokens/s. Quoted from the issue that set the bar; not measured here.
const PYTORCH_TOKENS_PER_S: &[(&str, &str, f64)] =
    &[("stories15m", "eager", 1051.0), ("stories15m", "torch.compile", 1160.0), ("stories110m", "eager", 207.0)];

/// The best GFLOP/s the GEMM crate reaches on this machine at the shapes of
/// `anetrain bench gemm` (measured now, briefly).
fn gemm_peak_gflops() -> f64 {
    let cfg =
        device::cpu::GemmBenchConfig { time_per_case: std::time::Duration::from_millis(200), ..Default::default() };
    device::cpu::bench_gemm(&cfg).iter().map(|r| r.direct_gflops).fold(0.0, f64::max)
}

/// Tokens for speed benchmarks: a step's speed does not depend on what the tokens say,
/// so a cheap deterministic scramble of the vocabulary (ids 3 and up) will do.
pub(crate) fn random_tokens(config: &llama::Config, batch: usize, seq: usize) -> Vec<u16> {
    let n_tokens = (batch * (seq + 1) * 4).max(4096);
    (0..n_tokens as u64)
        .map(|i| (3 + (i.wrapping_mul(2654435761) >> 7) % (config.vocab_size as u64 - 3)) as u16)
        .collect()
}

/// Training settings of the speed benchmarks: llama2.c's optimizer, no evaluation or
/// checkpoints, loss scaling with fp16.
pub(crate) fn bench_settings(
    steps: u64,
    batch: usize,
    seq: usize,
    precision: Precision,
) -> train::trainer::TrainConfig {
    train::trainer::TrainConfig {
        steps,
        lr: 1e-4,
        min_lr: 1e-5,
        warmup: 0,
        batch,
        accum: 1,
        seq,
        clip: 1.0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        eval_every: 0,
        eval_batches: 1,
        ckpt_every: 0,
        seed: 1,
        loss_scaling: precision == Precision::Fp16,
    }
}

/// Peak resident memory of this process in bytes (Linux: VmHWM), if readable.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `--device` of `bench train`: a device, or the ANE cost model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainBenchDevice {
    /// The CPU device (any machine).
    Cpu,
    /// The Apple Neural Engine (macOS on Apple Silicon).
    Ane,
    /// The ANE where there is one, else the CPU.
    Auto,
    /// No device: the step's time on an ANE, predicted from the kernels and schedule
    /// (train::cost_model; see --chip, --probe-json, --pipeline, --fusions).
    AneModel,
}

/// The flags of `bench train`.
#[derive(Args, Debug)]
pub struct TrainBench {
    #[arg(long, default_value = "stories15m")]
    model: String,
    /// Sequences per step; default 8, or 1 with --device ane-model (the seed's step, whose
    /// published figures the model reproduces).
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps per round (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: u64,
    /// Rounds of timed steps; the fastest round is reported (the least disturbed by
    /// other work on the machine). The GEMM peak is measured after each round and the
    /// best kept. With --pytorch, the rounds alternate with PyTorch's.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: TrainBenchDevice,
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// With --device ane-model: the chip (m1, m1pro, m1max, m2, m3, m3ultra, m4, m4pro,
    /// m4max, m5); default m4.
    #[arg(long)]
    chip: Option<String>,
    /// With --device ane-model: replace the chip's published figures by those measured by
    /// `anetrain probe --json` on a Mac (peak TFLOPS, dispatch overhead, surface bandwidth).
    #[arg(long, value_name = "FILE")]
    probe_json: Option<std::path::PathBuf>,
    /// With --device ane-model: the pipeline to model (default dynamic).
    #[arg(long, value_enum)]
    pipeline: Option<crate::train_cmd::PipelineArg>,
    /// With --device ane-model: model the static pipelines' --ane-extras.
    #[arg(long)]
    ane_extras: bool,
    /// With --device ane-model: upstream fusions to add to the schedule, comma-separated
    /// (rmsnorm, wo, classifier, async-dw, fewer-kernels, alpha), `all` or `none`.
    #[arg(long, value_name = "LIST")]
    fusions: Option<String>,
    /// With --device ane-model: micro-batches per optimizer step (default 10, the seed's);
    /// staged weights are copied once per optimizer step.
    #[arg(long)]
    accum: Option<usize>,
    /// Also measure PyTorch running llama2.c's model.py (the path given), or with
    /// `transformers` the transformers model of the preset (LlamaForCausalLM,
    /// Qwen2ForCausalLM, Qwen3ForCausalLM), on the same model, batch and thread count, in
    /// rounds alternating with ours (scripts/bench_pytorch.py; needs a Python with torch).
    #[arg(long, value_name = "MODEL_PY")]
    pytorch: Option<std::path::PathBuf>,
    /// The Python interpreter for --pytorch.
    #[arg(long, default_value = "python3")]
    python: String,
    /// With --pytorch: run llama2.c's model under torch.compile (the first round
    /// includes no compile time: the script warms up first).
    #[arg(long, requires = "pytorch")]
    pytorch_compile: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Compare full fine-tuning with LoRA fine-tuning of this rank (q,v) on the CPU
    /// device: ms/step, optimizer + gradient memory, ANE bytes per step on paper.
    #[arg(long, value_name = "RANK")]
    lora: Option<usize>,
    /// Data parallel: run under `mpirun -np N` (built with `--features mpi`); each rank
    /// trains one micro-batch of a step. Prints tokens/s per rank and in total, the time
    /// in gradient collectives and the bytes sent per step.
    #[arg(long, value_name = "N")]
    ranks: Option<usize>,
    /// With --ranks: ZeRO-1, the AdamW state sharded over the ranks.
    #[arg(long, requires = "ranks")]
    shard_optimizer: bool,
}

/// scripts/bench_pytorch.py, carried in the binary so `--pytorch` works from any folder.
const PYTORCH_SCRIPT: &str = include_str!("../../../scripts/bench_pytorch.py");

/// One PyTorch measurement: runs the script on llama2.c's `model_py`, returns its tokens/s.
fn pytorch_tokens_per_s(b: &TrainBench, model_py: &std::path::Path, threads: usize) -> Result<f64> {
    use anyhow::Context;
    use std::io::Write;
    use std::process::{Command, Stdio};
    // `python3 - ARGS` runs the program read from standard input.
    let mut child = Command::new(&b.python)
        .arg("-")
        .arg("--model-py")
        .arg(model_py)
        .args(["--model", &b.model, "--batch", &b.batch.unwrap_or(8).to_string(), "--seq", &b.seq.to_string()])
        .args(["--steps", &b.steps.to_string(), "--warmup", "2", "--threads", &threads.to_string(), "--json"])
        .args(b.pytorch_compile.then_some("--compile"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("--python {}: could not run it", b.python))?;
    child
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(PYTORCH_SCRIPT.as_bytes())
        .with_context(|| format!("--python {}: writing the script to it", b.python))?;
    let out = child.wait_with_output().with_context(|| format!("--python {}: waiting for it", b.python))?;
    if !out.status.success() {
        bail!(
            "--pytorch: {} scripts/bench_pytorch.py failed ({}):\n{}",
            b.python,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("--pytorch: unexpected output from the script: {line:?}"))?;
    v["tokens_per_s"].as_f64().with_context(|| format!("--pytorch: no tokens_per_s in {line}"))
}

/// The training phases that run no GEMM: their time is memory traffic, and stays
/// whatever the GEMM rate (see the floor in [`bench_train`]).
const MEMORY_BOUND_PHASES: [&str; 4] = ["surface_io", "rmsnorm", "optimizer", "other"];

fn bench_train(b: &TrainBench) -> Result<()> {
    use train::trainer::Trainer;
    if let Some(rank) = b.lora {
        if matches!(b.device, TrainBenchDevice::AneModel) {
            let chip = b.chip.clone().unwrap_or_else(|| "m4".into());
            return crate::lora_cmd::bench_ane_model(
                &b.model,
                rank,
                b.batch.unwrap_or(1),
                b.seq,
                &chip,
                b.probe_json.as_deref(),
            );
        }
        return crate::lora_cmd::bench(&b.model, rank, b.batch.unwrap_or(8), b.seq, b.steps, b.rounds);
    }
    let device_arg = match b.device {
        TrainBenchDevice::AneModel => return bench_train_model(b),
        TrainBenchDevice::Cpu => DeviceArg::Cpu,
        TrainBenchDevice::Ane => DeviceArg::Ane,
        TrainBenchDevice::Auto => DeviceArg::Auto,
    };
    if b.chip.is_some()
        || b.probe_json.is_some()
        || b.pipeline.is_some()
        || b.ane_extras
        || b.fusions.is_some()
        || b.accum.is_some()
    {
        bail!(
            "--chip, --probe-json, --pipeline, --ane-extras, --fusions and --accum describe a modelled step: they \
             need --device ane-model"
        );
    }
    let (spec, batch, seq, steps) = (b.model.as_str(), b.batch.unwrap_or(8), b.seq, b.steps);
    if steps == 0 || b.rounds == 0 {
        bail!("--steps and --rounds must be at least 1");
    }
    if let Some(path) = &b.pytorch {
        if path.as_os_str() != "transformers" && !path.is_file() {
            bail!(
                "--pytorch {}: no such file (the path of llama2.c's model.py, or `transformers` for the \
                 transformers model of the preset)",
                path.display()
            );
        }
    }
    let params = model_or_preset(spec)?;
    let config = params.config().clone();
    if seq > config.seq_len {
        bail!("--seq {seq} is larger than the model's context of {}", config.seq_len);
    }
    let device = open_device(device_arg, b.precision)?;
    if let Some(ranks) = b.ranks {
        return bench_train_ranks(b, ranks, device.as_ref(), params, batch);
    }
    let tokens = random_tokens(&config, batch, seq);
    let data = train::data::Dataset::from_tokens("random tokens", tokens, config.vocab_size, seq)?;
    let settings = bench_settings(steps * b.rounds as u64 + 1, batch, seq, b.precision);
    let mut trainer = Trainer::new(device.as_ref(), params, settings, data, None)?;
    let mut telemetry = train::telemetry::Telemetry::none();
    trainer.step(&mut telemetry)?; // warm-up: first-touch of every buffer

    // The fastest round: (seconds, tokens, FLOPs, phases).
    let mut best: Option<(f64, f64, f64, train::telemetry::PhasesMs)> = None;
    let mut torch_runs = Vec::new();
    let mut gemm_peak = 0f64;
    for round in 0..b.rounds {
        let warm = trainer.cumulative;
        let mut phases = train::telemetry::PhasesMs::default();
        for _ in 0..steps {
            trainer.step(&mut telemetry)?;
            phases.add(&trainer.last_phases);
        }
        let c = trainer.cumulative;
        let secs = c.train_seconds - warm.train_seconds;
        if best.as_ref().is_none_or(|(s, ..)| secs < *s) {
            best = Some((secs, (c.tokens - warm.tokens) as f64, c.total_flops - warm.total_flops, phases));
        }
        // The peak is measured every round, like the rounds themselves, and the best kept:
        // one measurement taken while the machine runs slow would flatter the ratio.
        gemm_peak = gemm_peak.max(gemm_peak_gflops());
        if let Some(model_py) = &b.pytorch {
            if !b.json {
                eprintln!("round {}/{}: PyTorch …", round + 1, b.rounds);
            }
            torch_runs.push(pytorch_tokens_per_s(b, model_py, rayon::current_num_threads())?);
        }
    }
    let (secs, tokens, flops, phases) = best.expect("at least one round");
    let ms_per_step = secs * 1e3 / steps as f64;
    let tokens_per_s = tokens / secs;
    let gflops = flops / secs / 1e9;
    let phases: Vec<(&str, f64)> = phases.named().iter().map(|&(k, v)| (k, v / steps as f64)).collect();
    let torch_best = torch_runs.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));

    // The fastest step this machine could run with this step's work: every FLOP at the
    // GEMM peak, plus the phases that do no GEMM (memory-bound copies and sweeps) as
    // measured. A floor on the step time, so a ceiling on tokens/s: a bar above it
    // cannot be met by faster kernels alone.
    let memory_bound_ms: f64 =
        phases.iter().filter(|(name, _)| MEMORY_BOUND_PHASES.contains(name)).map(|(_, ms)| ms).sum();
    let floor_ms = flops / steps as f64 / (gemm_peak * 1e9) * 1e3 + memory_bound_ms;
    let ceiling_tokens_per_s = tokens / steps as f64 / (floor_ms / 1e3);

    let n = config.n_params() as f64;
    let t = (batch * seq) as f64;
    let (d, q, kv, h, l) = (
        config.dim as f64,
        config.q_dim() as f64,
        config.kv_dim() as f64,
        config.hidden_dim as f64,
        config.n_layers as f64,
    );
    // Parameters, gradients, AdamW's two moments; the activations the backward pass
    // needs (per layer: x, its norm, q, k, v, attention output, mid-stream x and its
    // norm, h1, h3, and with QK-norm q and k before it), all fp32.
    let qk_norm = if config.qk_norm { q + kv } else { 0.0 };
    let activation_bytes = 4.0 * l * t * (4.0 * d + 2.0 * q + 2.0 * kv + 2.0 * h + qk_norm);
    let min_bytes = 16.0 * n + activation_bytes;
    let peak = peak_rss_bytes();
    let reference: Vec<(&str, f64)> =
        PYTORCH_TOKENS_PER_S.iter().filter(|(m, _, _)| *m == spec).map(|(_, how, v)| (*how, *v)).collect();
    if b.json {
        let v = serde_json::json!({
            "model": spec, "params": config.n_params(), "batch": batch, "seq": seq, "steps": steps,
            "rounds": b.rounds, "device": device.name(), "precision": b.precision.name(),
            "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s, "gflops": gflops,
            "gemm_peak_gflops": gemm_peak, "ratio_to_gemm_peak": gflops / gemm_peak,
            "peak_rss_bytes": peak, "theoretical_min_bytes": min_bytes, "activation_bytes": activation_bytes,
            "bytes_per_param_at_peak": peak.map(|p| p as f64 / n),
            "phases_ms": phases.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
            "pytorch_measured_tokens_per_s": torch_best,
            "pytorch_compile": b.pytorch_compile,
            "pytorch_measured_runs": torch_runs,
            "flops_per_token": flops / tokens,
            "floor_ms_per_step": floor_ms, "ceiling_tokens_per_s": ceiling_tokens_per_s,
            "pytorch_reference_tokens_per_s": reference.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "bench train: {spec} ({:.1} M params), batch {batch} × seq {seq}, on {} ({}), {steps} timed steps{}",
        n / 1e6,
        device.name(),
        b.precision.name(),
        if b.rounds > 1 { format!(" × {} rounds (the fastest shown)", b.rounds) } else { String::new() }
    );
    println!("  ms/step                 {ms_per_step:>10.1}");
    println!("  tokens/s                {tokens_per_s:>10.1}");
    println!("  achieved GFLOP/s        {gflops:>10.1}");
    println!("  GEMM peak GFLOP/s       {gemm_peak:>10.1}  (the gemm crate, best of {} measurements now)", b.rounds);
    println!("  ratio to GEMM peak      {:>10.1} %", 100.0 * gflops / gemm_peak);
    println!(
        "  floor at the GEMM peak  {floor_ms:>10.1} ms/step = {ceiling_tokens_per_s:.1} tokens/s  \
         (every FLOP at the peak, plus the GEMM-free phases as measured: {memory_bound_ms:.1} ms)"
    );
    match peak {
        Some(p) => println!(
            "  peak memory (RSS)       {:>10.1} MB  vs theoretical minimum {:.1} MB ({:.2}×)",
            p as f64 / 1e6,
            min_bytes / 1e6,
            p as f64 / min_bytes
        ),
        None => println!("  peak memory             n/a (no /proc/self/status on this system)"),
    }
    println!(
        "  of which                {:>10.1} MB for the {:.0} M parameters at 16 bytes each (weights, gradients, \
         AdamW's 2 moments; {:.1} bytes per parameter at the peak), {:.1} MB of activations kept for the backward",
        16.0 * n / 1e6,
        n / 1e6,
        peak.map_or(f64::NAN, |p| p as f64 / n),
        activation_bytes / 1e6
    );
    println!("  ms per phase (mean of the round's steps):");
    for (name, ms) in &phases {
        println!("    {name:<20}  {ms:>10.1}  {:>5.1} %", 100.0 * ms / ms_per_step);
    }
    if let Some(t) = torch_best {
        let how = if b.pytorch_compile { "compiled" } else { "eager" };
        println!(
            "  vs PyTorch {how}, measured now {:>6.2}×  ({t:.0} tokens/s: llama2.c's model.py, best of {} rounds)",
            tokens_per_s / t,
            torch_runs.len()
        );
    }
    for (how, v) in &reference {
        println!("  vs PyTorch {how:<14} {:>10.2}×  ({v} tokens/s, from another run)", tokens_per_s / v);
    }
    // What the bar (1.3× PyTorch) asks of this machine: the same FLOPs per
    // token at 1.3× the fastest PyTorch figure, against this run's best GEMM peak.
    let flops_per_token = flops / tokens;
    if let Some(fastest) = torch_best.into_iter().chain(reference.iter().map(|r| r.1)).reduce(f64::max) {
        let need = 1.3 * fastest * flops_per_token / 1e9;
        println!(
            "  1.3× PyTorch ({:.0} tokens/s) needs {need:.1} GFLOP/s: {:.1} % of the GEMM peak (now {:.1} %)",
            1.3 * fastest,
            100.0 * need / gemm_peak,
            100.0 * gflops / gemm_peak
        );
        println!(
            "  the floor's ceiling is {:.2}× PyTorch ({fastest:.0} tokens/s){}",
            ceiling_tokens_per_s / fastest,
            if ceiling_tokens_per_s < 1.3 * fastest { ": 1.3× is out of this machine's reach" } else { "" }
        );
    }
    Ok(())
}

/// `bench train --ranks N` under `mpirun -np N`: data-parallel steps, one micro-batch of
/// `batch` sequences per rank and step; rank 0 prints.
fn bench_train_ranks(
    b: &TrainBench,
    ranks: usize,
    device: &dyn device::Device,
    params: llama::Params,
    batch: usize,
) -> Result<()> {
    use train::distributed::{Distributed, BUCKET};
    let comm = train::distributed::init().map_err(anyhow::Error::msg)?;
    if comm.size() != ranks {
        bail!(
            "--ranks {ranks}: this process is one of {} rank(s); run `mpirun -np {ranks} anetrain bench train --ranks \
             {ranks} …` with an anetrain built with `--features mpi`",
            comm.size()
        );
    }
    if b.json || b.pytorch.is_some() || b.rounds != 1 {
        bail!("--ranks does not go with --json, --pytorch or --rounds");
    }
    let config = params.config().clone();
    let n_params = params.len();
    let tokens = random_tokens(&config, batch, b.seq);
    let data = train::data::Dataset::from_tokens("random tokens", tokens, config.vocab_size, b.seq)?;
    let mut settings = bench_settings(b.steps + 1, batch, b.seq, b.precision);
    settings.accum = ranks;
    let mut trainer = train::trainer::Trainer::new(device, params, settings, data, None)?;
    trainer.distribute(Distributed::new(comm.clone()).with_sharded_optimizer(b.shard_optimizer))?;
    let mut telemetry = train::telemetry::Telemetry::none();
    trainer.step(&mut telemetry)?; // warm-up
    let (warm, warm_comm) = (trainer.cumulative, trainer.distributed().stats());
    let start = Instant::now();
    for _ in 0..b.steps {
        trainer.step(&mut telemetry)?;
    }
    let wall = start.elapsed().as_secs_f64();
    let (c, stats) = (trainer.cumulative, trainer.distributed().stats());
    let steps = b.steps as f64;
    let total_tokens_per_s = (c.tokens - warm.tokens) as f64 / wall;
    // Every rank's time in collectives, averaged over the ranks.
    let mut comm_s = [stats.seconds - warm_comm.seconds];
    comm.all_reduce_sum_f64(&mut comm_s);
    let comm_ms = comm_s[0] / ranks as f64 / steps * 1e3;
    let bytes = (stats.bytes_sent - warm_comm.bytes_sent) / steps;
    let optimizer = trainer.distributed().optimizer_bytes_of(&trainer);
    if !trainer.distributed().is_root() {
        return Ok(());
    }
    println!(
        "bench train --ranks {ranks}: {} ({:.1} M params), batch {batch} × seq {} per rank, on {} over {}{}, {} timed \
         steps",
        b.model,
        n_params as f64 / 1e6,
        b.seq,
        device.name(),
        comm.backend(),
        if b.shard_optimizer { ", optimizer sharded (ZeRO-1)" } else { "" },
        b.steps
    );
    let ms = wall / steps * 1e3;
    println!("  ms/step                 {ms:>10.1}");
    println!("  tokens/s total          {total_tokens_per_s:>10.1}");
    println!("  tokens/s per rank       {:>10.1}", total_tokens_per_s / ranks as f64);
    println!("  collectives ms/step     {comm_ms:>10.1}  ({:.1} % of the step; mean over ranks)", 100.0 * comm_ms / ms);
    println!(
        "  hidden behind backward  {:>10.1} %  (the collectives run after the backward: docs/DISTRIBUTED.md)",
        0.0
    );
    println!(
        "  bytes sent per step     {:>10.1} MB per rank  (fp32 gradients, ring-algorithm payload; buckets of {} MiB)",
        bytes / 1e6,
        (BUCKET * 4) >> 20
    );
    println!(
        "  optimizer state         {:>10.1} MB per rank  (AdamW m and v; unsharded {:.1} MB)",
        optimizer as f64 / 1e6,
        (8 * n_params) as f64 / 1e6
    );
    Ok(())
}

/// `bench train --device ane-model`: the predicted step (crate::ane_model_cmd).
fn bench_train_model(b: &TrainBench) -> Result<()> {
    if b.pytorch.is_some() {
        bail!("--pytorch measures a real run: it does not go with --device ane-model");
    }
    let kind = b.pipeline.map_or(train::pipelines::PipelineKind::Dynamic, Into::into);
    crate::ane_model_cmd::run(&crate::ane_model_cmd::ModelArgs {
        model: b.model.clone(),
        batch: b.batch.unwrap_or(1),
        seq: b.seq,
        chip: b.chip.clone().unwrap_or_else(|| "m4".into()),
        probe_json: b.probe_json.clone(),
        pipeline: train::pipelines::PipelineConfig::new(kind, b.ane_extras),
        fusions: b.fusions.clone().unwrap_or_else(|| "none".into()),
        accum: b.accum.unwrap_or(10),
        json: b.json,
    })
}

/// One column of `bench pipelines`.
struct PipelineRun {
    label: String,
    wall: f64,
    compile: f64,
    train: f64,
    stall: f64,
    steps: u64,
    compiles: u64,
    per_compile: usize,
}

/// Trains `steps` steps of `spec` (random tokens) with each pipeline on a fresh CPU
/// device and prints a markdown table.
fn bench_pipelines(
    spec: &str,
    steps: u64,
    batch: usize,
    seq: Option<usize>,
    sim_compile_ms: u64,
    precision: Precision,
) -> Result<()> {
    use train::pipelines::{PipelineConfig, PipelineKind};
    use train::trainer::Trainer;
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let params = model_or_preset(spec)?;
    let config = params.config().clone();
    let seq = seq.unwrap_or(config.seq_len.min(128));
    if seq == 0 || seq > config.seq_len {
        bail!("--seq {seq} must be between 1 and the model's context of {}", config.seq_len);
    }
    let tokens = random_tokens(&config, batch, seq);
    let settings = bench_settings(steps, batch, seq, precision);
    let pipelines = [
        PipelineConfig::new(PipelineKind::Dynamic, false),
        PipelineConfig::new(PipelineKind::Static, false),
        PipelineConfig::new(PipelineKind::Static, true),
        PipelineConfig::new(PipelineKind::DoubleBuffer, false),
    ];
    let mut runs = Vec::new();
    for pipeline in pipelines {
        let device = device::cpu::CpuDevice::new(precision).with_sim_compile_ms(sim_compile_ms);
        let data = train::data::Dataset::from_tokens("random tokens", tokens.clone(), config.vocab_size, seq)?;
        let start = Instant::now();
        let mut trainer = Trainer::with_pipeline(&device, params.clone(), settings.clone(), pipeline, data, None)?;
        let mut telemetry = train::telemetry::Telemetry::none();
        for _ in 0..steps {
            trainer.step(&mut telemetry)?;
        }
        let c = trainer.cumulative;
        runs.push(PipelineRun {
            label: pipeline.label(),
            wall: start.elapsed().as_secs_f64(),
            compile: c.compile_seconds,
            train: c.train_seconds,
            stall: c.compile_stall_seconds,
            steps: c.steps,
            compiles: c.compiles,
            per_compile: trainer.kernels_per_compile(),
        });
    }
    println!(
        "bench pipelines: {spec} ({:.2} M params, {} layers), batch {batch} × seq {seq}, {steps} steps, CPU device \
         ({}), compiles {}\n",
        config.n_params() as f64 / 1e6,
        config.n_layers,
        precision.name(),
        if sim_compile_ms > 0 {
            format!("emulated at ≥ {sim_compile_ms} ms each")
        } else {
            "at the CPU device's own speed".into()
        }
    );
    print!("{}", pipelines_table(&runs));
    Ok(())
}

/// The markdown table of `bench pipelines`.
fn pipelines_table(runs: &[PipelineRun]) -> String {
    let mut out = String::new();
    let row = |out: &mut String, name: &str, cell: &dyn Fn(&PipelineRun) -> String| {
        let cells: Vec<String> = runs.iter().map(cell).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    };
    let labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
    out.push_str(&format!("| | {} |\n", labels.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---:|".repeat(runs.len())));
    row(&mut out, "wall time", &|r| format!("{:.2} s", r.wall));
    row(&mut out, "compile time (share of wall)", &|r| {
        format!("{:.2} s ({:.0} %)", r.compile, 100.0 * r.compile / r.wall)
    });
    row(&mut out, "train time (share of wall)", &|r| format!("{:.2} s ({:.0} %)", r.train, 100.0 * r.train / r.wall));
    row(&mut out, "ms/step (wall / steps)", &|r| format!("{:.1}", 1e3 * r.wall / r.steps as f64));
    row(&mut out, "kernels per compile", &|r| {
        if r.per_compile == 0 {
            format!("{} (once)", r.compiles)
        } else {
            r.per_compile.to_string()
        }
    });
    row(&mut out, "kernels compiled", &|r| r.compiles.to_string());
    row(&mut out, "compile stall (waiting for the background)", &|r| {
        if r.label.starts_with("double-buffer") {
            format!("{:.3} s", r.stall)
        } else {
            "—".into()
        }
    });
    out
}
