//! `anetrain train`: train a model, by default the built-in tiny config on the built-in
//! story corpus (no downloads), and `anetrain export`.
//!
//! Training with a pipeline that recompiles (`--pipeline static`, `double-buffer`) meets
//! the ANE's per-process compile budget; before a step would exceed it, the command
//! checkpoints and `exec()`s itself with the same arguments plus `--resume`, and the run
//! continues in a fresh process ([`restart`]). `--sim-compile-limit` gives the CPU device
//! such a budget, so this is exercised anywhere.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use device::ane::binding::BindingRules;
use device::probe::{self, IoChoice};
use device::{cpu::CpuDevice, Device, Precision};
use indicatif::{ProgressBar, ProgressStyle};
use llama::{Config, Params, Sampler, Tokenizer};
use train::binding::IoConvention;
use train::data::{Dataset, HoldOut};
use train::model::{generate, Decoder};
use train::pipelines::{PipelineConfig, PipelineKind};
use train::telemetry::{Event, Telemetry};
use train::trainer::{self, TrainConfig, Trainer};

use crate::devices::{open_device, DeviceArg};

/// Stories in the built-in corpus. About 1.5 MB of text: enough variety that the tiny
/// model's loss keeps falling for a few hundred steps.
const BUILTIN_STORIES: usize = 6000;
/// Vocabulary of the BPE tokenizer trained on the built-in corpus (llama2.c's small models use 512).
pub(crate) const BUILTIN_VOCAB: usize = 512;
/// Fraction of the built-in tokens held out for validation.
const BUILTIN_VAL_FRACTION: f64 = 0.05;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A preset (tiny, stories260k, stories15m, stories42m, stories110m), a llama2.c
    /// model.bin to start from, an anetrain checkpoint, or a Hugging Face model folder
    /// (Llama, Llama 3, Mistral, Qwen2, Qwen3: config.json + safetensors, sharded too).
    #[arg(long, visible_alias = "init", default_value = "tiny")]
    pub model: String,
    /// Pretokenized u16 shards (llama2.c layout); default: the built-in story corpus.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// A separate validation shard; default: the last 5 % of the data.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// tokenizer.bin for the model (copied beside the checkpoint); the built-in corpus
    /// trains one when none is given.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    /// Final learning rate of the cosine decay; default: lr / 10.
    #[arg(long)]
    pub min_lr: Option<f32>,
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Tokens per sequence; default: the model's context, at most 256.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Global-norm gradient clipping; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    #[arg(long, default_value = "runs/default/ckpt.bin")]
    pub ckpt: PathBuf,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub ckpt_every: u64,
    /// Continue from --ckpt (same run, bit-identically). --steps, --lr, --min-lr and
    /// --warmup may change the rest of the run; flags that would change its model or
    /// batch are refused.
    #[arg(long)]
    pub resume: bool,
    /// Replace the checkpoint at --ckpt with a new run (without it, an existing
    /// checkpoint is refused: continue it with --resume).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Stop cleanly after step K (checkpointed), without changing the schedule.
    #[arg(long)]
    pub stop_after: Option<u64>,
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 4)]
    pub eval_batches: usize,
    /// JSON-lines telemetry to this file, or `-` for stdout.
    #[arg(long)]
    pub telemetry: Option<PathBuf>,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Tokens of sample text printed at the end (0: none).
    #[arg(long, default_value_t = 120)]
    pub sample_steps: usize,
    /// No progress bar (for logs and tests).
    #[arg(long)]
    pub quiet: bool,
    /// How the kernels get their weights: `dynamic` (in their input surfaces, compiled
    /// once), `static` (baked in, recompiled after every step) or `double-buffer` (baked
    /// in, recompiled in the background while training goes on, one step stale). With
    /// --resume: the checkpoint's pipeline unless given.
    #[arg(long, value_enum)]
    pub pipeline: Option<PipelineArg>,
    /// Also run the final RMSNorm, the classifier with its softmax and the RMSNorm
    /// backward as device kernels (static and double-buffer pipelines).
    #[arg(long)]
    pub ane_extras: bool,
    /// How kernels bind their surfaces: `packed` (one input and one output surface per
    /// kernel, as the seed's working ANE pipeline; the default) or `multi` (a surface per
    /// input group and per output). With --device ane, the binding order of `multi` comes
    /// from `anetrain probe io-convention --device ane` (see --ane-io-probe).
    #[arg(long, value_enum)]
    pub ane_io: Option<AneIoArg>,
    /// The report of `anetrain probe io-convention --device ane --json FILE` that
    /// --device ane reads to choose the I/O convention and binding order.
    #[arg(long, value_name = "FILE", default_value = device::probe::IO_CONVENTION_FILE)]
    pub ane_io_probe: PathBuf,
    /// CPU device: refuse compiles after N per process, as the ANE does after ≈119;
    /// training then checkpoints and restarts itself to continue.
    #[arg(long, value_name = "N")]
    pub sim_compile_limit: Option<usize>,
    /// CPU device: make every compile take at least MS milliseconds, as the ANE's do
    /// (tens to hundreds), to see what double-buffered compilation hides.
    #[arg(long, value_name = "MS")]
    pub sim_compile_ms: Option<u64>,
    // ── LoRA (crate::lora_cmd) ──
    #[command(flatten)]
    pub lora: crate::lora_cmd::LoraArgs,
    /// Data-parallel runs (`mpirun -np N anetrain train …`, built with `--features mpi`):
    /// ZeRO-1, each rank keeps the AdamW state of 1/N of the parameters (same results).
    #[arg(long)]
    pub shard_optimizer: bool,
    /// The flags given on the command line (not defaulted), by argument id.
    #[arg(skip)]
    pub given: Vec<String>,
}

impl TrainArgs {
    /// True when `--flag` (by argument id: `min_lr`) was given on the command line.
    pub(crate) fn gave(&self, id: &str) -> bool {
        self.given.iter().any(|g| g == id)
    }
}

/// The ids of the arguments given on the command line in `matches`.
pub fn given_flags(matches: &clap::ArgMatches) -> Vec<String> {
    matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

/// `--pipeline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AneIoArg {
    Packed,
    Multi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PipelineArg {
    Dynamic,
    Static,
    DoubleBuffer,
}

impl From<PipelineArg> for PipelineKind {
    fn from(p: PipelineArg) -> PipelineKind {
        match p {
            PipelineArg::Dynamic => PipelineKind::Dynamic,
            PipelineArg::Static => PipelineKind::Static,
            PipelineArg::DoubleBuffer => PipelineKind::DoubleBuffer,
        }
    }
}

/// The I/O convention for `--device ane`: from the io-convention probe's report when
/// there is one; without it, packed (the seed's working convention), and `multi` is
/// refused, naming the probe to run.
fn ane_io_choice(args: &TrainArgs) -> Result<IoChoice> {
    let want_multi = args.ane_io == Some(AneIoArg::Multi);
    let path = &args.ane_io_probe;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            probe::choose_io_convention(&text, want_multi).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !want_multi => Ok(IoChoice::Packed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--ane-io multi: no io-convention report at {}; run `anetrain probe io-convention --device ane --json {}` \
             on this Mac first (it finds the order in which this chip binds several surfaces)",
            path.display(),
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The device, with the CPU device's emulated compile budget and latency when asked for,
/// and the I/O convention its kernels use.
pub(crate) fn training_device(args: &TrainArgs) -> Result<(Box<dyn Device>, IoConvention)> {
    let requested = match args.ane_io {
        Some(AneIoArg::Multi) => IoConvention::Multi,
        _ => IoConvention::Packed,
    };
    if args.device == DeviceArg::Ane {
        if args.sim_compile_limit.is_some() || args.sim_compile_ms.is_some() {
            bail!("--sim-compile-limit and --sim-compile-ms emulate the ANE on the CPU device; they need --device cpu");
        }
        let choice = ane_io_choice(args)?;
        let ane = device::ane::AneDevice::open()?;
        return Ok(match choice {
            IoChoice::Packed => (Box::new(ane.with_binding(BindingRules::exact(false))), IoConvention::Packed),
            IoChoice::Multi { declaration_order } => {
                (Box::new(ane.with_binding(BindingRules::exact(!declaration_order))), IoConvention::Multi)
            }
        });
    }
    Ok((training_cpu_device(args)?, requested))
}

/// The CPU (or auto) device, with the emulated compile budget and latency when asked for.
fn training_cpu_device(args: &TrainArgs) -> Result<Box<dyn Device>> {
    if args.sim_compile_limit.is_none() && args.sim_compile_ms.is_none() {
        return open_device(args.device, args.precision);
    }
    let mut cpu = CpuDevice::new(args.precision);
    if let Some(n) = args.sim_compile_limit {
        if n == 0 {
            bail!("--sim-compile-limit 0 allows no compile at all; give at least the compiles of one step");
        }
        cpu = cpu.with_compile_limit(n);
    }
    if let Some(ms) = args.sim_compile_ms {
        cpu = cpu.with_sim_compile_ms(ms);
    }
    Ok(Box::new(cpu))
}

/// What the data step produced: the splits and the tokenizer to save beside the model.
pub(crate) struct Data {
    pub(crate) train: Dataset,
    pub(crate) val: Option<Dataset>,
    pub(crate) tokenizer: Option<Tokenizer>,
}

/// The built-in corpus, tokenized with `tokenizer` or with a BPE vocabulary trained on it.
fn builtin_data(tokenizer: Option<Tokenizer>, vocab: usize, seq: usize, seed: u64) -> Result<Data> {
    let stories = train::corpus::generate(BUILTIN_STORIES, seed);
    let tokenizer = match tokenizer {
        Some(t) => t,
        None => train::bpe::train_tokenizer(&stories, BUILTIN_VOCAB)?,
    };
    tokenizer.check_vocab(vocab).context("the built-in corpus's tokenizer")?;
    let tokens = train::bpe::encode_texts(&tokenizer, &stories)?;
    let splits = Dataset::split_tokens("built-in corpus", tokens, BUILTIN_VAL_FRACTION, vocab, seq)?;
    Ok(Data { train: splits.train, val: splits.val, tokenizer: Some(tokenizer) })
}

pub(crate) fn load_data(args: &TrainArgs, config: &Config, seq: usize, tokenizer: Option<Tokenizer>) -> Result<Data> {
    if args.data.is_empty() {
        if args.val_data.is_some() {
            bail!("--val-data needs --data: the built-in corpus makes its own validation split");
        }
        if Path::new(&args.model).is_dir() {
            bail!(
                "--model {} is a Hugging Face folder: it trains on shards tokenized with its own tokenizer \
                 (anetrain data pretokenize --tokenizer {}/tokenizer.json --in TEXT --out DIR), given with --data",
                args.model,
                args.model
            );
        }
        return builtin_data(tokenizer, config.vocab_size, seq, args.seed);
    }
    let hold_out = match &args.val_data {
        Some(p) => HoldOut::Shard(p.clone()),
        None => HoldOut::Fraction(0.05),
    };
    let splits = Dataset::open(&args.data, &hold_out, config.vocab_size, seq)?;
    Ok(Data { train: splits.train, val: splits.val, tokenizer })
}

/// Model parameters to start from: a preset (random init), a model.bin or a checkpoint.
pub(crate) fn initial_params(spec: &str, seed: u64, tokenizer_vocab: Option<usize>) -> Result<Params> {
    if let Some(mut config) = Config::preset(spec) {
        // A fresh model takes its vocabulary from its tokenizer.
        if let Some(v) = tokenizer_vocab {
            config.vocab_size = v;
        }
        return Ok(Params::init(&config, seed)?);
    }
    let path = Path::new(spec);
    if !path.exists() {
        bail!("--model `{spec}` is neither a preset ({}) nor a file", llama::config::PRESETS.join(", "));
    }
    crate::load_model(path)
}

/// Refuses flags of a resumed run that would change what the checkpoint fixed (model,
/// batch shape, optimizer), naming each; returns notes for those that change the rest of
/// the run (steps, learning-rate schedule), which the caller applies.
fn check_resume_flags(
    args: &TrainArgs,
    ckpt: &trainer::CheckpointSummary,
    tokenizer_vocab: Option<usize>,
    ranks: usize,
) -> Result<Vec<String>> {
    let keep = "a resumed run keeps it: drop the flag, or start a new run with --overwrite";
    if args.gave("model") {
        let given = match Config::preset(&args.model) {
            Some(mut c) => {
                c.vocab_size = tokenizer_vocab.unwrap_or(ckpt.config.vocab_size);
                c
            }
            None => initial_params(&args.model, args.seed, tokenizer_vocab)?.config().clone(),
        };
        let shape = |c: &Config| (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len);
        if shape(&given) != shape(&ckpt.config) {
            bail!(
                "--model {}: the checkpoint {} holds another model (dim {}, {} layers, vocabulary {}); {keep}",
                args.model,
                args.ckpt.display(),
                ckpt.config.dim,
                ckpt.config.n_layers,
                ckpt.config.vocab_size
            );
        }
    }
    let t = &ckpt.train;
    let fixed: [(&str, &str, String, String); 10] = [
        ("batch", "--batch", args.batch.to_string(), t.batch.to_string()),
        // A checkpoint counts the micro-batches of a step over all ranks (--accum × ranks).
        ("accum", "--accum × ranks", (args.accum * ranks).to_string(), t.accum.to_string()),
        ("seq", "--seq", args.seq.map_or(String::new(), |s| s.to_string()), t.seq.to_string()),
        ("clip", "--clip", args.clip.to_string(), t.clip.to_string()),
        ("weight_decay", "--weight-decay", args.weight_decay.to_string(), t.weight_decay.to_string()),
        ("beta1", "--beta1", args.beta1.to_string(), t.beta1.to_string()),
        ("beta2", "--beta2", args.beta2.to_string(), t.beta2.to_string()),
        ("eps", "--eps", args.eps.to_string(), t.eps.to_string()),
        ("seed", "--seed", args.seed.to_string(), t.seed.to_string()),
        ("eval_batches", "--eval-batches", args.eval_batches.to_string(), t.eval_batches.to_string()),
    ];
    for (id, flag, given, theirs) in fixed {
        if args.gave(id) && given != theirs {
            bail!("{flag} {given}: the checkpoint {} was trained with {flag} {theirs}; {keep}", args.ckpt.display());
        }
    }
    let mut notes = Vec::new();
    if args.gave("steps") {
        if args.steps <= ckpt.step && !(args.steps == ckpt.step && ckpt.eval_pending) {
            bail!(
                "--steps {}: the checkpoint {} is at step {} already; give --steps above {} to train on",
                args.steps,
                args.ckpt.display(),
                ckpt.step,
                ckpt.step
            );
        }
        if args.steps != t.steps {
            notes.push(format!("--steps {}: the run now ends there (it was to end at step {})", args.steps, t.steps));
        }
    }
    let schedule_given = ["lr", "min_lr", "warmup"].iter().any(|id| args.gave(id));
    if schedule_given {
        let (lr, min_lr, warmup) = resume_schedule(args, t);
        if (lr, min_lr, warmup) != (t.lr, t.min_lr, t.warmup) {
            notes.push(format!(
                "the learning-rate schedule changes from lr {} → {} (warmup {}) to lr {lr} → {min_lr} (warmup {warmup}) \
                 for the steps to come",
                t.lr, t.min_lr, t.warmup
            ));
        }
    }
    Ok(notes)
}

/// The schedule of a resumed run: the flags given, the checkpoint's for the others (with
/// --lr alone, the final rate is lr / 10 as for a new run).
fn resume_schedule(args: &TrainArgs, t: &TrainConfig) -> (f32, f32, u64) {
    let lr = if args.gave("lr") { args.lr } else { t.lr };
    let min_lr = match args.min_lr {
        Some(m) if args.gave("min_lr") => m,
        _ if args.gave("lr") => lr / 10.0,
        _ => t.min_lr,
    };
    let warmup = if args.gave("warmup") { args.warmup } else { t.warmup };
    (lr, min_lr, warmup)
}

pub fn run(args: TrainArgs) -> Result<()> {
    // Data parallel (docs/DISTRIBUTED.md): under mpirun every rank runs this. An error on
    // one rank, named with its rank, ends the whole job (no rank waits forever in a
    // collective); the abort comes before MPI is finalised.
    let comm = train::distributed::init().map_err(anyhow::Error::msg)?;
    let (rank, ranks) = (comm.rank(), comm.size());
    // LoRA runs have their own trainer and pipeline (crate::lora_cmd), on one process.
    let lora = args.lora.enabled() || (args.resume && train::lora_trainer::is_lora_checkpoint(&args.ckpt));
    let result = if lora && ranks > 1 {
        Err(anyhow::anyhow!("--lora: LoRA runs are not data-parallel yet; run them as one process (no mpirun)"))
    } else if lora {
        crate::lora_cmd::run(args)
    } else {
        run_rank(args, comm.clone())
    };
    if let (Err(e), true) = (&result, ranks > 1) {
        eprintln!("anetrain: rank {rank} of {ranks}: error: {e:#}\nanetrain: rank {rank}: aborting the job");
        train::distributed::abort_job(1);
    }
    result
}

fn run_rank(args: TrainArgs, comm: std::rc::Rc<dyn train::distributed::Collective>) -> Result<()> {
    let process_start = std::time::Instant::now();
    let (root, ranks) = (comm.rank() == 0, comm.size());
    // The device and its flags first: a mistake there is named before anything else.
    let (device, io) = training_device(&args)?;
    // Nothing is lost: a checkpoint a kill -9 left half-written goes; an existing
    // checkpoint is continued (--resume) or replaced (--overwrite), never silently;
    // and a path that cannot take a checkpoint is found now, not after the run.
    let stale_temps = if root { train::checkpoint::remove_stale_temps(&args.ckpt) } else { Vec::new() };
    for stale in stale_temps {
        eprintln!("note: removed {}, a checkpoint write that an ended process left unfinished", stale.display());
    }
    if args.ckpt.is_file() && !args.resume && !args.overwrite {
        let what = trainer::checkpoint_summary(&args.ckpt)
            .map(|s| format!(" (a checkpoint at step {} of {})", s.step, s.train.steps))
            .unwrap_or_default();
        bail!(
            "--ckpt {} already exists{what}: continue it with --resume, or pass --overwrite to replace it",
            args.ckpt.display()
        );
    }
    if root {
        train::checkpoint::check_writable(&args.ckpt).context("--ckpt: cannot write a checkpoint there")?;
    }
    let given_tokenizer = match &args.tokenizer {
        Some(p) => Some(Tokenizer::read(p)?),
        None if args.resume => {
            let beside = args.ckpt.with_file_name("tokenizer.bin");
            beside.exists().then(|| Tokenizer::read(&beside)).transpose()?
        }
        None => None,
    };
    let builtin = args.data.is_empty();
    // The built-in corpus trains its own 512-token vocabulary for fresh models.
    let tokenizer_vocab = match (&given_tokenizer, builtin) {
        (Some(t), _) => Some(t.vocab_size()),
        (None, true) => Some(BUILTIN_VOCAB),
        (None, false) => None,
    };

    let resuming = args.resume && args.ckpt.exists();
    if args.resume && !resuming {
        eprintln!("note: --resume: no checkpoint at {} yet, starting a new run", args.ckpt.display());
    }
    let summary = if resuming { Some(trainer::checkpoint_summary(&args.ckpt)?) } else { None };
    let resume_notes = match &summary {
        Some(s) => check_resume_flags(&args, s, tokenizer_vocab, ranks)?,
        None => Vec::new(),
    };
    let config = if let Some(s) = &summary {
        s.config.clone()
    } else {
        initial_params(&args.model, args.seed, tokenizer_vocab)?.config().clone()
    };
    let seq = args.seq.unwrap_or(config.seq_len.min(256));
    if seq == 0 {
        bail!("--seq: must be at least 1");
    }
    if seq > config.seq_len {
        bail!("--seq {seq} is larger than the model's context of {} tokens", config.seq_len);
    }
    let data = load_data(&args, &config, seq, given_tokenizer)?;

    let pipeline = match (args.pipeline, args.ane_extras) {
        (Some(kind), extras) => Some(PipelineConfig::new(kind.into(), extras)),
        (None, true) if resuming => {
            bail!("--ane-extras with --resume needs --pipeline too (without it the checkpoint's pipeline continues)")
        }
        // A fresh run's default pipeline: `validate` says what --ane-extras needs.
        (None, true) => Some(PipelineConfig::new(PipelineKind::Dynamic, true)),
        (None, false) => None,
    };
    let pipeline = match (pipeline, io) {
        (Some(p), io) => Some(PipelineConfig { io, ..p }),
        (None, IoConvention::Packed) => None,
        (None, _) if resuming => {
            bail!("--ane-io with --resume needs --pipeline too (without it the checkpoint's pipeline continues)")
        }
        (None, io) => Some(PipelineConfig { io, ..PipelineConfig::new(PipelineKind::Dynamic, false) }),
    };
    if let Some(p) = pipeline {
        p.validate().map_err(anyhow::Error::msg)?;
    }
    let mut trainer = if let Some(s) = &summary {
        let steps = args.gave("steps").then_some(args.steps);
        let mut trainer = Trainer::resume_with(device.as_ref(), &args.ckpt, steps, pipeline, data.train, data.val)?;
        let (lr, min_lr, warmup) = resume_schedule(&args, &s.train);
        if (lr, min_lr, warmup) != (s.train.lr, s.train.min_lr, s.train.warmup) {
            trainer.set_schedule(lr, min_lr, warmup)?;
        }
        for note in resume_notes.iter().filter(|_| root) {
            eprintln!("note: --resume: {note}");
        }
        trainer
    } else {
        let params = initial_params(&args.model, args.seed, tokenizer_vocab)?;
        let settings = TrainConfig {
            steps: args.steps,
            lr: args.lr,
            min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
            warmup: args.warmup,
            batch: args.batch,
            accum: args.accum * ranks,
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
            // The device's precision, not the flag's: the ANE computes in fp16 whatever
            // --precision says (found by running the ANE path on the emulation).
            loss_scaling: device.precision() == Precision::Fp16,
        };
        let pipeline = pipeline.unwrap_or_default();
        Trainer::with_pipeline(device.as_ref(), params, settings, pipeline, data.train, data.val)?
    };
    let dist = train::distributed::Distributed::new(comm.clone()).with_sharded_optimizer(args.shard_optimizer);
    trainer.distribute(dist)?;
    if let Some(t) = data.tokenizer.as_ref().filter(|_| root) {
        let path = args.ckpt.with_file_name("tokenizer.bin");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        t.write(&path)?;
    }

    let mut telemetry = match args.telemetry.as_ref().filter(|_| root) {
        Some(p) => Telemetry::open(p).with_context(|| format!("--telemetry {}", p.display()))?,
        None => Telemetry::none(),
    };
    telemetry.emit(&trainer.start_event(args.precision.name(), resuming))?;
    let last = args.stop_after.map_or(trainer.train.steps, |k| k.min(trainer.train.steps));
    let bar =
        progress_bar(!root || args.quiet || args.telemetry.as_deref() == Some(Path::new("-")), trainer.step, last);
    if ranks > 1 && root {
        let t = &trainer.train;
        eprintln!(
            "data parallel over {ranks} ranks ({}{}): effective batch {} × --accum {} × {ranks} ranks = {} sequences \
             of {} tokens per step",
            comm.backend(),
            if trainer.distributed().sharded() { ", optimizer state sharded (ZeRO-1)" } else { "" },
            t.batch,
            t.accum / ranks,
            t.batch * t.accum,
            t.seq
        );
    }
    if root {
        eprintln!(
            "training {} ({:.2} M params) on {} ({}, {} pipeline): {} steps of {}×{} tokens{}",
            if resuming { args.ckpt.display().to_string() } else { args.model.clone() },
            trainer.params.len() as f64 / 1e6,
            device.name(),
            args.precision.name(),
            trainer.pipeline_config().label(),
            trainer.train.steps,
            trainer.train.batch * trainer.train.accum,
            trainer.train.seq,
            if resuming { format!(", resuming after step {}", trainer.step) } else { String::new() }
        );
    }
    // Wall time counts this process from its start (setup and the first compile
    // included), on top of what earlier processes of the run counted.
    let session_start = process_start;
    let cumulative_wall = trainer.cumulative.wall_seconds;
    let mut last_val: Option<f32> = None;
    // Whether this process did anything: a fresh one always can (its first compiles
    // bake the checkpoint's parameters), so one that cannot would restart forever.
    let mut progressed = false;
    loop {
        // A step and the evaluation after it need not share a process: when the
        // evaluation's compiles do not fit after the step's, the next process runs it.
        let fits = if trainer.eval_pending { trainer.eval_fits() } else { trainer.step >= last || trainer.step_fits() };
        if !fits {
            bar.finish_and_clear();
            if !progressed {
                bail!(
                    "the device's compile budget ({} compiles left) cannot fit one step of the {} pipeline, which \
                     needs {}: raise --sim-compile-limit, or train with --pipeline dynamic (compiles once)",
                    device.compiles_left().unwrap_or(0),
                    trainer.pipeline_config().label(),
                    trainer.step_compiles_ahead()
                );
            }
            if ranks > 1 {
                trainer.save(&args.ckpt)?;
                bail!(
                    "the device's compile budget is spent after step {} (checkpointed), and a data-parallel run \
                     cannot restart its processes under mpirun: continue with --resume, or train with --pipeline \
                     dynamic (compiles once)",
                    trainer.step
                );
            }
            trainer.cumulative.wall_seconds = cumulative_wall + session_start.elapsed().as_secs_f64();
            return restart(&mut trainer, &args, device.as_ref(), &mut telemetry);
        }
        if trainer.eval_pending {
            if let Some(v) = trainer.evaluate()? {
                telemetry.emit(&Event::Eval { step: trainer.step, val_loss: v })?;
                last_val = Some(v);
            }
            trainer.eval_pending = false;
            progressed = true;
            continue;
        }
        if trainer.step >= last {
            break;
        }
        let info = trainer.step(&mut telemetry)?;
        progressed = true;
        let step = trainer.step;
        trainer.eval_pending = trainer.eval_due(step);
        if trainer.eval_pending && trainer.eval_fits() {
            if let Some(v) = trainer.evaluate()? {
                telemetry.emit(&Event::Eval { step, val_loss: v })?;
                last_val = Some(v);
            }
            trainer.eval_pending = false;
        }
        trainer.cumulative.wall_seconds = cumulative_wall + session_start.elapsed().as_secs_f64();
        if trainer.train.ckpt_every > 0 && step % trainer.train.ckpt_every == 0 && step < last {
            trainer.save(&args.ckpt)?;
            telemetry.emit(&Event::Checkpoint { step, path: args.ckpt.display().to_string() })?;
        }
        bar.set_position(step);
        bar.set_message(format!(
            "loss {:.4}{}  {:.0} tok/s{}",
            info.loss,
            last_val.map_or(String::new(), |v| format!("  val {v:.4}")),
            info.tokens_per_s,
            info.compile_stall_ms.map_or(String::new(), |ms| format!("  stall {ms:.0} ms"))
        ));
    }
    bar.finish_and_clear();
    trainer.cumulative.wall_seconds = cumulative_wall + session_start.elapsed().as_secs_f64();
    trainer.save(&args.ckpt)?;
    telemetry.emit(&Event::Checkpoint { step: trainer.step, path: args.ckpt.display().to_string() })?;
    let report = trainer.report();
    telemetry.emit(&Event::End { report })?;
    if !root {
        return Ok(());
    }
    eprintln!("{report}");
    eprintln!(
        "checkpoint: {} (step {}{})",
        args.ckpt.display(),
        trainer.step,
        last_val.map_or(String::new(), |v| format!(", val loss {v:.4}"))
    );
    if trainer.step < trainer.train.steps {
        eprintln!("stopped after step {}; continue with --resume", trainer.step);
    }
    if args.sample_steps > 0 {
        if let Some(t) = &data.tokenizer {
            print_sample(device.as_ref(), &trainer.params, t, args.sample_steps, args.seed)?;
        }
    }
    Ok(())
}

/// Checkpoints, emits the `restart` event and replaces this process with a fresh one
/// running the same command plus `--resume` (a fresh process has a fresh compile budget).
/// Returns only if `exec()` fails.
fn restart(trainer: &mut Trainer<'_>, args: &TrainArgs, device: &dyn Device, telemetry: &mut Telemetry) -> Result<()> {
    let step = trainer.step;
    // Counted before saving: the next process reads it from the checkpoint.
    trainer.cumulative.restarts += 1;
    trainer.save(&args.ckpt)?;
    telemetry.emit(&Event::Checkpoint { step, path: args.ckpt.display().to_string() })?;
    telemetry.emit(&Event::Restart { step, compiles_done: device.compiles_done() })?;
    let (next, needs) = if trainer.eval_pending {
        ("evaluation", trainer.eval_compiles_ahead())
    } else {
        ("step", trainer.step_compiles_ahead())
    };
    eprintln!(
        "compile budget: {} compiles done, {} left, the next {next} needs {needs}: checkpointed after step {step}, \
         restarting the process",
        device.compiles_done(),
        device.compiles_left().unwrap_or(0),
    );
    // Linux's /proc/self/exe still names this very binary when the file on disk was
    // replaced (a rebuild during a long run); elsewhere, the path it was started from.
    let proc_exe = Path::new("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe().context("restart: cannot find this program's path")?
    };
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // exec() runs no destructors: the ANE kernels' model directories go now.
    device::ane::model_dir::remove_all_before_exec();
    if !argv.iter().any(|a| a == "--resume") {
        argv.push("--resume".into());
    }
    exec(&exe, &argv)
}

#[cfg(unix)]
fn exec(exe: &Path, argv: &[std::ffi::OsString]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe).args(argv).exec();
    Err(err).with_context(|| format!("restart: exec {} failed", exe.display()))
}

#[cfg(not(unix))]
fn exec(_exe: &Path, _argv: &[std::ffi::OsString]) -> Result<()> {
    bail!("restarting needs exec(), which this system lacks: continue with --resume")
}

pub(crate) fn progress_bar(hidden: bool, pos: u64, len: u64) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("step {pos:>5}/{len}  {wide_bar}  {msg}  ETA {eta}")
            .expect("the template is valid")
            .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    bar.set_position(pos);
    bar
}

/// A short sample from the trained model, so the user sees what it learned.
pub(crate) fn print_sample(
    device: &dyn device::Device,
    params: &Params,
    tokenizer: &Tokenizer,
    steps: usize,
    seed: u64,
) -> Result<()> {
    let mut decoder = Decoder::new(device, params)?;
    let mut sampler = Sampler::new(0.8, 0.9, seed)?;
    let mut text = Vec::new();
    let steps = steps.min(params.config().seq_len);
    generate(
        &mut decoder,
        &[llama::tokenizer::BOS],
        steps,
        |l| sampler.sample(l),
        |prev, next| {
            text.extend_from_slice(llama::tokenizer::printable(tokenizer.decode(prev, next)));
        },
    )?;
    println!("── sample ──\n{}", String::from_utf8_lossy(&text).trim_end());
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// An anetrain checkpoint or a llama2.c model.bin.
    pub model: PathBuf,
    /// The llama2.c model.bin to write (tokenizer.bin is copied beside it).
    #[arg(long, required_unless_present_any = ["to_hf", "lora_adapter"], conflicts_with = "to_hf")]
    pub to: Option<PathBuf>,
    /// A Hugging Face folder to write instead: model.safetensors, config.json and
    /// tokenizer files (LlamaForCausalLM).
    #[arg(long)]
    pub to_hf: Option<PathBuf>,
    /// llama2.c format version: 0 (legacy, what llama2.c's run reads) or 1.
    #[arg(long = "format-version", default_value_t = 0)]
    pub format_version: u8,
    // ── LoRA (crate::lora_cmd) ──
    #[command(flatten)]
    pub lora: crate::lora_cmd::LoraExportArgs,
}

pub fn export(args: ExportArgs) -> Result<()> {
    if args.lora.lora_adapter.is_some()
        || args.lora.merge_lora
        || args.lora.lora.is_some()
        || train::lora_trainer::is_lora_checkpoint(&args.model)
    {
        return crate::lora_cmd::export(&args);
    }
    let params = crate::load_model(&args.model)?;
    export_params(&args, &params)
}

/// Writes `params` where `args` say (--to model.bin or --to-hf DIR).
pub(crate) fn export_params(args: &ExportArgs, params: &Params) -> Result<()> {
    let to = match (&args.to, &args.to_hf) {
        (_, Some(dir)) => return crate::hf_cmd::export_hf(params, &args.model, dir),
        (Some(to), None) => to,
        (None, None) => bail!("give --to model.bin or --to-hf DIR"),
    };
    let version = match args.format_version {
        0 => llama::llama2c::Version::V0,
        1 => llama::llama2c::Version::V1,
        v => bail!("--format-version {v}: llama2.c formats are 0 and 1"),
    };
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    llama::llama2c::write_model(params, to, version)?;
    let tok = args.model.with_file_name("tokenizer.bin");
    let dest = to.with_file_name("tokenizer.bin");
    if tok.exists() && tok != dest {
        std::fs::copy(&tok, &dest).with_context(|| format!("copying {} to {}", tok.display(), dest.display()))?;
    }
    eprintln!("wrote {} (llama2.c v{})", to.display(), args.format_version);
    Ok(())
}
